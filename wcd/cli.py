"""wcctl: command-line client for the wcd control API.

Standard library only (its one wcd import, wcd.control_socket, is too), so
it starts in well under 100 ms. It speaks HTTP/1.1 with JSON over the daemon's
Unix control socket. Every failure becomes one `wcctl: ...` line on stderr and
an exit status a script can branch on (see the EXIT_* constants).

Strings from the daemon (model names, paths, error messages) may come from
any API client, so every line for a person goes through `emit`, which shows
control characters escaped; `--json` output is escaped by JSON itself.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator

from wcd import control_socket

EXIT_FAILED = 1  # the operation failed (error event, 5xx, broken stream)
EXIT_USAGE = 2  # bad command line, or the daemon rejected the request (4xx)
EXIT_UNREACHABLE = 3  # no daemon at any socket we tried, or no permission
EXIT_NOT_FOUND = 4  # the daemon does not know the model (404)

# Queries answer at once from the daemon's state; only operations move weights.
QUERY_TIMEOUT_S = 10.0
OPERATION_TIMEOUT_S = 600.0
OPERATIONS = ("swap", "load", "unload", "prefetch")


class CliError(Exception):
    exit_code = EXIT_FAILED


class OperationFailed(CliError):
    exit_code = EXIT_FAILED


class InvalidRequest(CliError):
    exit_code = EXIT_USAGE


class DaemonUnreachable(CliError):
    exit_code = EXIT_UNREACHABLE


class ModelNotFound(CliError):
    exit_code = EXIT_NOT_FOUND


# --- finding and talking to the daemon ---------------------------------------

def socket_candidates(explicit: str | None) -> list[str]:
    """Where to look for the control socket, in order.

    A path the user named (--socket or $WCD_SOCKET) is the only candidate:
    falling back to another daemon's socket would act on the wrong daemon.
    """
    named = explicit or os.environ.get("WCD_SOCKET")
    if named:
        return [named]
    return control_socket.candidates()


def find_socket(candidates: list[str]) -> str:
    for path in candidates:
        try:
            os.stat(path)
        except PermissionError:
            return path  # it may be there; connecting names the real problem
        except OSError:
            continue
        return path
    raise DaemonUnreachable("daemon not running: no control socket at " + ", ".join(candidates))


class Response:
    """An HTTP/1.0 answer read straight off the socket. HTTP/1.0 keeps the
    body unchunked and ends it by closing, so a streamed NDJSON body is read
    line by line; and http.client alone would cost more start-up time than
    the whole round trip to the daemon."""

    def __init__(self, file):
        self.file = file
        status_line = file.readline(65536).decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ConnectionError(f"bad status line {status_line[:60]!r}")
        self.status, self.reason = int(code), reason.strip()
        while file.readline(65536) not in (b"\r\n", b"\n", b""):
            pass  # headers: nothing in them is needed

    def read(self) -> bytes:
        return self.file.read()

    def readline(self) -> bytes:
        return self.file.readline()


class Client:
    """One request per command; --timeout bounds the whole command."""

    def __init__(self, socket_path: str, timeout_s: float):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def get(self, path: str) -> dict:
        return _decode(self._read(self._request("GET", path).read))

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        """The events of an NDJSON answer, each as soon as its line arrives."""
        response = self._request("POST", path, body)
        while line := self._read(response.readline):
            if line.strip():
                yield _decode(line)

    def _request(self, method: str, path: str, body: dict | None = None) -> Response:
        self._connect()
        payload = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.0\r\nHost: wcd\r\n"
                "Accept: application/json, application/x-ndjson\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
        self._read(lambda: self.sock.sendall(head.encode() + payload))
        response = self._read(lambda: Response(self.sock.makefile("rb")))
        if response.status >= 300:
            raise http_error(response.status, response.reason, self._read(response.read))
        return response

    def _connect(self) -> None:
        path = self.socket_path
        self.sock.settimeout(self.timeout_s)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise DaemonUnreachable(f"daemon not running: no control socket at {path}") from None
        except ConnectionRefusedError:
            raise DaemonUnreachable(
                f"daemon not running: connection refused at {path}") from None
        except PermissionError:
            raise DaemonUnreachable(
                f"permission denied on {path} (is this user in group wcd?)") from None
        except TimeoutError:
            raise DaemonUnreachable(f"daemon not answering at {path}") from None
        except OSError as e:
            raise DaemonUnreachable(f"cannot connect to {path}: {e.strerror or e}") from None

    def _read(self, step):
        """Run one blocking step within the deadline; map transport failures."""
        remaining = self.deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            # Socket timeouts are per call: giving each call what is left of
            # the deadline makes --timeout a bound on the whole command.
            self.sock.settimeout(remaining)
            return step()
        except TimeoutError:
            raise OperationFailed(
                f"no result from the daemon within {self.timeout_s:g} s") from None
        except ConnectionError as e:
            detail = str(e) or type(e).__name__
            raise OperationFailed(f"lost the connection to the daemon ({detail})") from None


def _decode(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise OperationFailed(f"daemon sent something that is not JSON: {raw[:80]!r}") from None
    if not isinstance(doc, dict):
        raise OperationFailed(f"daemon sent an unexpected answer: {raw[:80]!r}")
    return doc


def http_error(status: int, reason: str, raw: bytes) -> CliError:
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        message = f"daemon answered HTTP {status} {reason}"
    if status == 404:
        return ModelNotFound(message)
    if 400 <= status < 500:
        return InvalidRequest(message)
    return OperationFailed(message)


# --- formatting ---------------------------------------------------------------

# C0, DEL and C1: what a terminal may act on (cursor moves, title changes,
# line breaks that forge output). Shown as repr shows them.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}
_ESCAPES.update({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def printable(text: str) -> str:
    """`text` with control characters escaped; escaping twice changes nothing."""
    return text.translate(_ESCAPES)


def emit(lines: list[str], stream=None) -> None:
    """Write lines for a person: wcctl's text output all leaves through here,
    but for the progress line, which `Progress` escapes the same way."""
    stream = stream or sys.stdout
    for line in lines:
        stream.write(printable(line) + "\n")


def fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_phases(phases: dict) -> str:
    return ", ".join(f"{name} {fmt_seconds(seconds)}" for name, seconds in phases.items())


def fmt_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if count < 1024:
        return f"{count} B"
    size = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def fmt_uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours:02d} h"
    if hours:
        return f"{hours} h {minutes:02d} m"
    return f"{minutes} m {secs:02d} s" if minutes else f"{secs} s"


def dash(value) -> str:
    return "-" if value is None else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    # Measured as they will be shown, so escaped cells keep the columns aligned.
    rows = [header, *([printable(cell) for cell in row] for row in rows)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]


def fmt_last_swap(swap: dict | None) -> str:
    if not swap:
        return "-"
    return f"{swap.get('model')} ({swap.get('path')}) {swap.get('total_s', 0):.3f} s"


def fmt_device(worker: dict) -> str:
    """The device and group size; a group serving a smaller model says so."""
    tp = worker.get("tensor_parallel_size", 1)
    using = worker.get("model_tensor_parallel_size") or tp
    return worker["device"] + (f" tp={tp}" if tp > 1 else "") + (
        f" (model tp={using})" if using != tp else "")


def fmt_pids(worker: dict) -> str:
    """The worker's pid, then its group's followers."""
    return ",".join(str(pid) for pid in [worker.get("pid"), *worker.get("group_pids", [])]
                    if pid is not None) or "-"


def fmt_residents(worker: dict) -> str:
    """Every resident model, with its state where it is not simply serving,
    and in a tensor-parallel group the rank a TP=1 model runs on."""
    residents = worker.get("residents")
    if residents is None:
        return dash(worker.get("model"))
    group = worker.get("tensor_parallel_size", 1) > 1
    return ", ".join(r["model"] + (f"@rank{r.get('rank', 0)}" if group and len(residents) > 1
                                   else "")
                     + ("" if r["state"] == "serving" else f" ({r['state']})")
                     for r in residents) or "-"


def fmt_memory(worker: dict) -> str:
    used, budget = worker.get("resident_bytes"), worker.get("memory_budget_bytes")
    if used is None:
        return "-"
    return fmt_bytes(used) + (f"/{fmt_bytes(budget)}" if budget else "")


def workers_table(workers: list[dict]) -> list[str]:
    rows = [[str(w["index"]), fmt_device(w), fmt_pids(w), w["state"], fmt_residents(w),
             fmt_memory(w), fmt_bytes(w.get("rss_bytes")), fmt_last_swap(w.get("last_swap"))]
            for w in workers]
    return table(["WORKER", "DEVICE", "PID", "STATE", "MODELS", "MEMORY", "RSS", "LAST SWAP"],
                 rows)


def ps_tables(doc: dict) -> list[str]:
    """Workers, then the models held anywhere but on disk."""
    lines = workers_table(doc.get("workers", []))
    held = doc.get("models") or []
    return lines + (["", *models_table(held)] if held else [])


def models_table(models: list[dict]) -> list[str]:
    rows = [[m["name"], m["state"], m["where"], dash(m.get("worker")), fmt_bytes(m.get("bytes")),
             str(m.get("active", 0)), str(m.get("waiting", 0)), m["path"]] for m in models]
    return table(["MODEL", "STATE", "WHERE", "WORKER", "SIZE", "RUNNING", "WAITING", "PATH"],
                 rows)


WHERE_WORDS = {"serving": "serving", "device": "parked on the device", "host": "in host memory",
               "disk": "on disk"}


def counts(items: list[str], words: dict[str, str] | None = None) -> str:
    words = words or {}
    return ", ".join(f"{n} {words.get(k, k)}" for k, n in Counter(items).items())


def status_summary(doc: dict) -> list[str]:
    workers, models = doc.get("workers", []), doc.get("models", [])
    serving = [f"{r['model']} on worker {w['index']}" for w in workers
               for r in w.get("residents", []) if r["state"] == "serving"]
    lines = [
        f"wcd {doc.get('version')} (pid {doc.get('pid')}): {doc.get('state')}, "
        f"up {fmt_uptime(doc.get('uptime_s', 0))}",
        f"workers: {len(workers)}" + (f" ({counts([w['state'] for w in workers])})"
                                      if workers else ""),
        f"models: {len(models)}" + (f" ({counts([m['where'] for m in models], WHERE_WORDS)})"
                                    if models else ""),
        "serving: " + ("; ".join(serving) or "nothing"),
        f"queue: {doc.get('queue', {}).get('waiting', 0)} waiting",
    ]
    return lines


def done_summary(event: dict) -> str:
    model, worker, path = event.get("model"), event.get("worker"), event.get("path")
    who = "wcd" if worker is None else f"worker {worker}"
    heads = {
        "noop": f"{who} already serves {model} (noop)",
        "unload": f"{model} unloaded" + ("" if worker is None else f" from worker {worker}"),
        "prefetch": f"{model} prefetched into host memory",
    }
    source = {"host_cache": ", from host memory", "disk": ", from disk",
              "snapshot_file": ", from its snapshot file",
              "parked": ", parked on the device"}.get(
        event.get("weights"), "")
    head = heads.get(path, f"{who} now serves {model} ({path}{source})")
    phases = event.get("phases") or {}
    tail = f": {fmt_phases(phases)}" if phases else ""
    return f"{head} in {event.get('total_s', 0):.3f} s{tail}"


def error_event_message(command: str, model: str, event: dict) -> str:
    error = event.get("error") or {}
    message = f"{command} {model} failed: {error.get('message', 'unknown error')}"
    if error.get("code"):
        message += f" [{error['code']}]"
    if event.get("serving"):
        message += f"; now serving {event['serving']}"
    return message


class Progress:
    """One status line on a terminal, rewritten in place as phases complete."""

    def __init__(self, command: str, model: str, stream, enabled: bool):
        self.head = f"{command} {model}"
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.phases: dict[str, float] = {}
        self.shown = False

    def on_event(self, event: dict) -> None:
        if event.get("event") == "accepted" and event.get("worker") is not None:
            self.head += f" on worker {event['worker']}"
        elif event.get("event") == "phase":
            self.phases[event.get("phase", "?")] = event.get("seconds", 0.0)
        self._show(f"{self.head}: {fmt_phases(self.phases) or 'accepted'}")

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _show(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except OSError:
            width = 0  # unknown, as is a terminal that reports 0 columns
        text = printable(text)
        if width > 1:
            # A line wider than the terminal wraps, and "\r" then rewrites
            # only its last row.
            text = text[: width - 1]
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self.shown = True


def print_json(doc: dict) -> None:
    print(json.dumps(doc, indent=2))


# --- commands -----------------------------------------------------------------

QUERIES = {
    "ps": ("/v1/workers", ps_tables),
    "models": ("/v1/models", lambda doc: models_table(doc.get("models", []))),
    "status": ("/v1/status", status_summary),
}


def cmd_query(client: Client, args) -> None:
    path, render = QUERIES[args.command]
    doc = client.get(path)
    if args.json:
        print_json(doc)
    else:
        emit(render(doc))


def operation_body(args) -> dict:
    body: dict = {"model": args.model}
    if args.command == "swap":
        body["worker"] = args.worker
    if args.command in ("swap", "unload"):
        body["force"] = args.force
    return body


def cmd_operation(client: Client, args) -> None:
    progress = Progress(args.command, args.model, sys.stderr, enabled=not args.json)
    final = None
    try:
        for event in client.stream(f"/v1/{args.command}", operation_body(args)):
            if event.get("event") in ("done", "error"):
                final = event
                break
            progress.on_event(event)
    finally:
        progress.clear()
    if final is None:
        raise OperationFailed(f"{args.command} {args.model}: the daemon ended the stream "
                              "without a result")
    if args.json:
        print_json(final)
    if final["event"] == "error":
        raise OperationFailed(error_event_message(args.command, args.model, final))
    if not args.json:
        emit([done_summary(final)])


COMMANDS = {**{name: cmd_query for name in QUERIES},
            **{name: cmd_operation for name in OPERATIONS}}


# --- command line -------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and mapped like every other error."""

    def error(self, message: str):
        raise InvalidRequest(f"{message} (see '{self.prog} --help')")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> Parser:
    # The global options are accepted after the command too ("wcctl ps
    # --socket X"); SUPPRESS keeps a subcommand from resetting them.
    def common(defaults: bool) -> Parser:
        parent = Parser(add_help=False)
        suppress = {} if defaults else {"default": argparse.SUPPRESS}
        parent.add_argument("--socket", metavar="PATH", **suppress,
                            help="control socket (default: $WCD_SOCKET, "
                                 f"{control_socket.SYSTEM}, then per-user paths)")
        parent.add_argument("--timeout", metavar="S", type=positive_float, **suppress,
                            help=f"give up after S seconds (default {OPERATION_TIMEOUT_S:g} "
                                 f"for operations, {QUERY_TIMEOUT_S:g} for queries)")
        parent.add_argument("--json", action="store_true", **suppress,
                            help="print the JSON document and nothing else on stdout")
        return parent

    parser = Parser(prog="wcctl", parents=[common(defaults=True)],
                    description="Control a running wcd daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = [common(defaults=False)]
    swap = sub.add_parser("swap", parents=shared, help="serve MODEL on a worker now")
    swap.add_argument("--worker", type=int, metavar="N", help="the worker to swap (default: "
                      "the daemon's choice)")
    swap.add_argument("--force", action="store_true", help="abort in-flight requests "
                      "instead of draining them")
    sub.add_parser("load", parents=shared, help="load MODEL beside the models resident now")
    unload = sub.add_parser("unload", parents=shared, help="stop serving MODEL")
    unload.add_argument("--force", action="store_true", help="abort in-flight requests "
                        "instead of draining them")
    sub.add_parser("prefetch", parents=shared, help="read MODEL into host memory")
    for name in OPERATIONS:
        sub.choices[name].add_argument("model", metavar="MODEL",
                                       help="config alias, local directory or hub id")
    sub.add_parser("ps", parents=shared, help="list workers")
    sub.add_parser("models", parents=shared, help="list known models")
    sub.add_parser("status", parents=shared, help="summarise the daemon")
    return parser


def run(argv: list[str] | None) -> None:
    args = build_parser().parse_args(argv)
    timeout = args.timeout or (OPERATION_TIMEOUT_S if args.command in OPERATIONS
                               else QUERY_TIMEOUT_S)
    client = Client(find_socket(socket_candidates(args.socket)), timeout)
    COMMANDS[args.command](client, args)


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
        sys.stdout.flush()
    except CliError as e:
        emit([f"wcctl: {e}"], sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("wcctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # "wcctl ps | head": the reader left; say nothing, and keep the
        # interpreter's final flush from complaining about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
