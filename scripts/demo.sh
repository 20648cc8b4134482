#!/usr/bin/env bash
# `make run`: start wcd, swap small-a -> small-b, ask small-b for a chat
# completion over the OpenAI API, show what runs, stop wcd. Exits 0 on success.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$PWD/.venv/bin
log=.cache/wcd-demo.log
api=http://127.0.0.1:8000
# A private runtime directory gives this demo its own control socket (the
# default one lands under it), so it neither finds nor disturbs another wcd.
export XDG_RUNTIME_DIR=$PWD/.cache/run
export WCD_SOCKET=$XDG_RUNTIME_DIR/wcd/control.sock
mkdir -p "$XDG_RUNTIME_DIR"
chmod 700 "$XDG_RUNTIME_DIR"

daemon=
stop_daemon() {
    kill -TERM "$daemon" 2>/dev/null || return 0
    for _ in $(seq 300); do
        kill -0 "$daemon" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$daemon" 2>/dev/null; then
        echo "wcd did not stop within 30 s of SIGTERM; killing it" >&2
        kill -KILL "$daemon" 2>/dev/null || true
    fi
}
on_exit() {
    local status=$?
    if [[ -n $daemon ]] && kill -0 "$daemon" 2>/dev/null; then
        stop_daemon
        wait "$daemon" 2>/dev/null || true
    fi
    if ((status != 0)); then
        echo "demo failed (status $status); last lines of $log:" >&2
        tail -n 30 "$log" >&2 || true
    fi
}
trap on_exit EXIT

"$bin/wcd" --config etc/wcd.yaml >"$log" 2>&1 </dev/null &
daemon=$!
echo "wcd started (pid $daemon), log in $log"

wait_ready() {
    for _ in $(seq 240); do
        "$bin/wcctl" status >/dev/null 2>&1 && return 0
        kill -0 "$daemon" 2>/dev/null || { echo "wcd exited during start" >&2; return 1; }
        sleep 0.5
    done
    echo "wcd did not answer 'wcctl status' within 120 s" >&2
    return 1
}
wait_ready
"$bin/wcctl" status

echo "+ wcctl swap small-a"
"$bin/wcctl" swap small-a
echo "+ wcctl swap small-b"
"$bin/wcctl" swap small-b

echo "+ POST $api/v1/chat/completions (model small-b)"
"$bin/python" -c '
import json, sys, urllib.request
body = {"model": "small-b", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "hello, what is your name?"}]}
request = urllib.request.Request(sys.argv[1] + "/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as response:
    reply = json.load(response)
print("model:", reply["model"])
print("text: ", repr(reply["choices"][0]["message"]["content"]))
' "$api"

echo "+ wcctl ps"
"$bin/wcctl" ps

echo "+ stopping wcd (SIGTERM)"
stop_daemon
status=0
wait "$daemon" || status=$?
daemon=
if ((status != 0)); then
    echo "wcd exited with status $status after SIGTERM" >&2
    exit 1
fi
echo "demo OK"
