"""etc/wcd.yaml -> validated, typed, frozen settings.

The daemon checks its own keys and types here, at start, so a typo fails
`wcd --check-config` (and the start) with one line naming the file and the
dotted key, instead of surfacing later as a mysterious runtime behaviour.
vLLM engine args (`defaults` and model entries) pass through untouched: vLLM
is the authority on them and the worker checks them at load.

Rules the file follows:

- Unknown keys are errors, except engine args.
- A key set to null (or left empty, `key:`) takes its default.
- Durations are seconds (a number) or text such as "500ms", "30s", "5m",
  "1h30m", "1d".
- Relative paths resolve against the config file's directory. A relative
  model `path` may also be relative to the first model root: the
  config-directory reading wins if that directory exists; otherwise the first
  existing reading wins; if neither exists, the first one inside a model root
  does (the model may be written later; the worker reports it at load).
- A model must lie inside a model root once symlinks are resolved, so a path
  cannot step out of the roots through a link.
"""

from __future__ import annotations

import grp
import math
import os
import pwd
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NoReturn

import yaml

from wcd import control_socket

SYSTEM_CONFIG = "/etc/wcd/wcd.yaml"
BUILTIN_SOURCE = "<built-in defaults>"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    """One line: `<file>: <dotted key>: <problem>` (the key is left out when the
    problem is with the file as a whole)."""

    def __init__(self, problem: str, *, source: str | None = None, key: str | None = None):
        text = ": ".join(part for part in (source, key, problem) if part)
        super().__init__(" ".join(text.split()))
        self.problem = problem
        self.source = source
        self.key = key


# ---- settings -------------------------------------------------------------------


@dataclass(frozen=True)
class ControlSettings:
    socket: str
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class HttpSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    # Keys limited to some models: key -> the names (aliases or paths) it may use.
    key_models: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # What one request may ask for; past these a client gets 413 or 400.
    max_body_bytes: int = 8 << 20
    max_prompts: int = 64  # prompts in one completions request
    max_choices: int = 128  # prompts x n
    max_sampling_bytes: int = 1 << 20  # sampling fields and chat_template_kwargs, encoded
    # Connections: a stream write that waits longer on its client aborts the
    # request; idle keep-alive and a request head that does not arrive in time
    # close the connection; past max_connections new ones are closed at once.
    write_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    max_connections: int = 1024
    # The status page and /status.json show paths, PIDs and memory: behind the
    # API keys unless opened.
    open_status: bool = False
    # vLLM's --trust-request-chat-template: a client's own Jinja template (in
    # chat_template_kwargs) runs in the worker only when the operator allows it.
    trust_request_chat_template: bool = False
    # vLLM's --return-tokens-as-token-ids: logprob tokens as "token_id:N" where
    # a request does not say (tokens that are not valid UTF-8 alone stay
    # identifiable).
    return_tokens_as_token_ids: bool = False


@dataclass(frozen=True)
class WorkerSettings:
    """One worker, or with tensor_parallel_size N > 1 a group of N processes
    (on CUDA, devices cuda:K .. cuda:K+N-1 for device cuda:K), serving models
    of the tensor-parallel sizes in `serves` (default N alone)."""

    device: str = "cpu"
    tensor_parallel_size: int = 1
    serves_tensor_parallel_sizes: tuple[int, ...] = ()

    @property
    def serves(self) -> tuple[int, ...]:
        return self.serves_tensor_parallel_sizes or (self.tensor_parallel_size,)

    @property
    def kind(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def cuda_indices(self) -> tuple[int, ...]:
        if self.kind != "cuda":
            return ()
        first = int(self.device.split(":", 1)[1])
        return tuple(range(first, first + self.tensor_parallel_size))


@dataclass(frozen=True)
class ModelSettings:
    name: str
    path: str
    keep_alive_s: float | None  # None: the policy's keep_alive applies
    engine_args: dict = field(default_factory=dict)
    # vLLM's parsers of the model's chat output (vllm serve's --tool-call-parser
    # with --enable-auto-tool-choice, and --reasoning-parser); None: none.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


@dataclass(frozen=True)
class PolicySettings:
    keep_alive_s: float = 0.0  # 0 = keep forever; idle models unloaded after this
    max_parked: int = 0  # swapped-out engines kept on each worker's device
    park_min_free_bytes: int = 2 << 30  # parked engines yield to keep this free
    host_cache_bytes: int = 0
    queue_max: int = 64  # requests waiting for a model, per model
    queue_wait_s: float = 60.0  # longest a request waits for its model before 503
    drain_timeout_s: float = 30.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 10.0
    restart_backoff_min_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    worker_ready_timeout_s: float = 300.0
    stop_timeout_s: float = 20.0
    # A worker that stayed up this long restarts after the minimum backoff again.
    restart_backoff_reset_s: float = 300.0
    # Whether an OpenAI request may load a model that no worker serves.
    on_demand: bool = True
    # How long a model stays before an OpenAI request may evict it (wcctl may always).
    min_resident_s: float = 5.0
    # Models a worker keeps resident and steps side by side (a tensor-parallel
    # group: one), and the bytes their footprints may take on it (0: 90% of
    # the device's memory; the host's available memory on CPU).
    max_resident: int = 4
    worker_memory_bytes: int = 0
    # How long busy residents may keep a waiting model out before one of
    # them is suspended (its requests paused, resumed later) to make room.
    preempt_after_s: float = 2.0
    # A chat template render on a worker's main thread that runs longer is
    # aborted (the request gets 400); an engine step that runs longer restarts
    # the worker: nothing may hold a worker silently.
    render_timeout_s: float = 10.0
    step_timeout_s: float = 120.0


@dataclass(frozen=True)
class Settings:
    control: ControlSettings
    http: HttpSettings
    workers: tuple[WorkerSettings, ...]
    model_roots: tuple[str, ...]
    defaults: dict
    models: dict[str, ModelSettings]
    preload: tuple[str, ...]
    policy: PolicySettings
    log_level: str
    source: str | None

    def engine_args(self, model: ModelSettings) -> dict:
        return {**self.defaults, **model.engine_args}

    def in_model_roots(self, path: str) -> bool:
        """Whether a path-named model may be served from `path` (absolute)."""
        return _inside_roots(path, self.model_roots)


# ---- entry points ---------------------------------------------------------------


def find_config(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    if os.environ.get("WCD_CONFIG"):
        return os.environ["WCD_CONFIG"]
    return SYSTEM_CONFIG if os.path.exists(SYSTEM_CONFIG) else None


def load_settings(path: str | None, overrides: dict | None = None) -> Settings:
    """The file's settings; `overrides` are laid over its sections key by key
    (a section's other keys stay as the file has them), before any check, so
    the file's relative paths still resolve against its directory."""
    if path is None:
        return replace(parse_settings({}, BUILTIN_SOURCE), source=None)
    data = _read_yaml(path)
    if overrides and isinstance(data, dict):
        data = _overlaid(data, overrides)
    return parse_settings(data, path)


def _overlaid(data: dict, overrides: dict) -> dict:
    result = dict(data)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = {**result[key], **value}
        else:
            result[key] = value
    return result


def parse_settings(data: object, source: str) -> Settings:
    base_dir = os.path.dirname(os.path.abspath(source))
    top = _Reader(data, source, "", _TOP_KEYS)
    roots = top.get("model_roots", _list_of(_path_under(base_dir)), ())
    models = _parse_models(top.section("models", None), base_dir, roots)
    return Settings(
        control=_parse_control(top.section("control", _CONTROL_KEYS), base_dir),
        http=_parse_http(top.section("http", _HTTP_KEYS)),
        workers=_parse_workers(top, "workers"),
        model_roots=roots,
        defaults=_engine_args(top.section("defaults", None), own=(), refused=_NOT_DEFAULTS),
        models=models,
        preload=top.get("preload", _unique(_list_of(_alias_in(models))), ()),
        policy=_parse_policy(top.section("policy", _POLICY_KEYS)),
        log_level=top.get("log_level", _log_level, "info"),
        source=source,
    )


def parse_duration(value: object) -> float:
    """Seconds from a number or text such as "30s", "5m", "1h30m"; ValueError if
    neither."""
    if isinstance(value, str):
        return _duration_text(value)
    seconds = _number(value)
    if seconds < 0:
        raise _Invalid(f"expected a duration >= 0, got {value}")
    return seconds


# ---- YAML -------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice: PyYAML would let the last one
    win silently, hiding half of what the operator wrote."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str) -> object:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=path) from None
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_problem(e), source=path) from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return f"invalid YAML: {error}"
    context = f" ({error.context})" if getattr(error, "context", None) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {error.problem}{context}"


# ---- reading mappings -------------------------------------------------------------


class _Invalid(ValueError):
    """A value's problem; `at` continues the key path into a list (`[2]`)."""

    def __init__(self, problem: str, at: str = ""):
        super().__init__(problem)
        self.at = at


class _Reader:
    """One mapping of the file, with its dotted key path for error messages.
    `keys` lists the keys allowed here (None: any, for engine args); the rest
    are refused before any value is read, so a misspelt section is reported
    as itself rather than as whatever its absence breaks downstream."""

    def __init__(self, data: object, source: str, path: str, keys: tuple[str, ...] | None):
        self.source = source
        self.path = path
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"expected a mapping, got {_type(data)}", source=source, key=path or None)
        self.data = data
        for name in data if keys is not None else ():
            if name not in keys:
                self.fail(name, f"unknown key (known here: {', '.join(keys)})")

    def key(self, name: object) -> str:
        return f"{self.path}.{name}" if self.path else str(name)

    def fail(self, name: object, problem: str, at: str = "") -> NoReturn:
        raise ConfigError(problem, source=self.source, key=self.key(name) + at)

    def get(self, name: str, parse: Callable[[object], Any], default: Any) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        try:
            return parse(value)
        except _Invalid as e:
            self.fail(name, str(e), e.at)

    def section(self, name: str, keys: tuple[str, ...] | None) -> _Reader:
        return _Reader(self.data.get(name), self.source, self.key(name), keys)


# ---- sections ---------------------------------------------------------------------

_TOP_KEYS = ("control", "http", "workers", "model_roots", "defaults", "models", "preload", "policy", "log_level")
_CONTROL_KEYS = ("socket", "allow_uids", "allow_gids")
_HTTP_KEYS = ("host", "port", "api_keys", "max_body_bytes", "max_prompts", "max_choices",
              "max_sampling_bytes", "write_timeout", "keepalive_timeout", "header_timeout",
              "max_connections", "open_status", "trust_request_chat_template",
              "return_tokens_as_token_ids")
_API_KEY_KEYS = ("key", "models")
_WORKER_KEYS = ("device", "tensor_parallel_size", "serves_tensor_parallel_sizes")
_MODEL_KEYS = ("path", "keep_alive", "tool_call_parser", "reasoning_parser")
_POLICY_KEYS = (
    "keep_alive", "max_parked", "park_min_free_bytes", "host_cache_bytes", "queue_max", "queue_wait", "drain_timeout",
    "health_interval", "health_timeout", "restart_backoff_min", "restart_backoff_max",
    "worker_ready_timeout", "stop_timeout", "restart_backoff_reset", "on_demand", "min_resident",
    "render_timeout", "step_timeout", "max_resident", "worker_memory_bytes",
    "preempt_after",
)
# Keys that look at home in `defaults` but are wcd's, not vLLM's: refused there
# rather than handed to vLLM, which would fail every load with them.
_NOT_DEFAULTS = {
    "path": "a model's own key, not a default",
    "keep_alive": "a model's own key; the default for all models is policy.keep_alive",
    "tool_call_parser": "a model's own key: the parser must fit the model's output",
    "reasoning_parser": "a model's own key: the parser must fit the model's output",
}
# vLLM's `model` engine arg would contradict the model's `path`.
_NOT_ENGINE_ARGS = {
    "model": "set by wcd from the model's path; use `path`",
    # vllm serve's flag, not an engine arg: a model's tool_call_parser turns it on.
    "enable_auto_tool_choice": "set the model's tool_call_parser, which enables it",
}


def _parse_control(section: _Reader, base_dir: str) -> ControlSettings:
    return ControlSettings(
        socket=section.get("socket", _path_under(base_dir), None) or control_socket.daemon_default(),
        allow_uids=section.get("allow_uids", _list_of(_id_of(pwd.getpwnam, "user")), ()),
        allow_gids=section.get("allow_gids", _list_of(_id_of(grp.getgrnam, "group")), ()),
    )


def _parse_http(section: _Reader) -> HttpSettings:
    configured = section.get("api_keys", _list_of(_api_key), ())
    from_env = (key.strip() for key in os.environ.get("WCD_API_KEYS", "").split(","))
    d = HttpSettings()
    return HttpSettings(
        host=section.get("host", _text, d.host),
        port=section.get("port", _port, d.port),
        api_keys=tuple(dict.fromkeys([*(key for key, _ in configured),
                                      *(key for key in from_env if key)])),
        key_models={key: models for key, models in configured if models},
        max_body_bytes=section.get("max_body_bytes", _positive_int, d.max_body_bytes),
        max_prompts=section.get("max_prompts", _positive_int, d.max_prompts),
        max_choices=section.get("max_choices", _positive_int, d.max_choices),
        max_sampling_bytes=section.get("max_sampling_bytes", _positive_int,
                                       d.max_sampling_bytes),
        write_timeout_s=section.get("write_timeout", _positive_duration, d.write_timeout_s),
        keepalive_timeout_s=section.get("keepalive_timeout", _positive_duration,
                                        d.keepalive_timeout_s),
        header_timeout_s=section.get("header_timeout", _positive_duration, d.header_timeout_s),
        max_connections=section.get("max_connections", _positive_int, d.max_connections),
        open_status=section.get("open_status", _bool, d.open_status),
        trust_request_chat_template=section.get("trust_request_chat_template", _bool,
                                                d.trust_request_chat_template),
        return_tokens_as_token_ids=section.get("return_tokens_as_token_ids", _bool,
                                               d.return_tokens_as_token_ids),
    )


def _api_key(value: object) -> tuple[str, tuple[str, ...]]:
    """A key as text (every model), or {key, models} for a key limited to those."""
    if not isinstance(value, dict):
        return _text(value), ()
    unknown = sorted(set(value) - set(_API_KEY_KEYS), key=str)
    if unknown:
        raise _Invalid(f"unknown key (known here: {', '.join(_API_KEY_KEYS)})", f".{unknown[0]}")
    if value.get("key") is None:
        raise _Invalid("required (the bearer token)", ".key")
    key = _at(".key", _text, value["key"])
    models = _at(".models", _list_of(_text), value.get("models") or [])
    return key, models


def _parse_workers(top: _Reader, name: str) -> tuple[WorkerSettings, ...]:
    entries = top.get(name, _list, None)
    if entries is None:
        return (WorkerSettings(),)
    if not entries:
        top.fail(name, "expected at least one worker")
    workers: list[WorkerSettings] = []
    for index, entry in enumerate(entries):
        section = _Reader(entry, top.source, top.key(f"{name}[{index}]"), _WORKER_KEYS)
        size = section.get("tensor_parallel_size", _positive_int, 1)
        serves = section.get("serves_tensor_parallel_sizes", _list_of(_positive_int), ())
        if any(m > size for m in serves):
            section.fail("serves_tensor_parallel_sizes",
                         f"sizes above the worker's tensor_parallel_size {size}: "
                         f"{sorted(m for m in serves if m > size)}")
        worker = WorkerSettings(device=section.get("device", _device, "cpu"),
                                tensor_parallel_size=size,
                                serves_tensor_parallel_sizes=tuple(sorted(set(serves))))
        taken = {i for other in workers for i in other.cuda_indices}
        if taken & set(worker.cuda_indices):
            section.fail("device", f"cuda:{min(taken & set(worker.cuda_indices))} is given to "
                                   "another worker already")
        workers.append(worker)
    return tuple(workers)


def _parse_models(section: _Reader, base_dir: str, roots: tuple[str, ...]) -> dict[str, ModelSettings]:
    models = {}
    for alias in section.data:
        if not isinstance(alias, str) or not alias or any(c.isspace() for c in alias):
            section.fail(alias, "a model alias must be a non-empty string without spaces")
        models[alias] = _parse_model(section.section(alias, None), alias, base_dir, roots)
    return models


def _parse_model(entry: _Reader, alias: str, base_dir: str, roots: tuple[str, ...]) -> ModelSettings:
    raw_path = entry.get("path", _text, None)
    if raw_path is None:
        entry.fail("path", "required (the model's directory)")
    if not roots:
        entry.fail("path", "no model_roots are configured, and a model must lie inside one")
    path = _model_path(raw_path, base_dir, roots)
    if not _inside_roots(path, roots):
        entry.fail("path", f"{path} is outside every model root ({', '.join(roots)})")
    return ModelSettings(
        name=alias,
        path=path,
        keep_alive_s=entry.get("keep_alive", parse_duration, None),
        engine_args=_engine_args(entry, own=_MODEL_KEYS, refused={}),
        tool_call_parser=entry.get("tool_call_parser", _text, None),
        reasoning_parser=entry.get("reasoning_parser", _text, None),
    )


def _engine_args(section: _Reader, *, own: tuple[str, ...], refused: dict[str, str]) -> dict:
    """The section's vLLM engine args: every key but wcd's `own` ones (read
    elsewhere); a `refused` key is an error, with its hint."""
    refused = {**_NOT_ENGINE_ARGS, **refused}
    args = {}
    for name, value in section.data.items():
        if name in refused:
            section.fail(name, refused[name])
        if not isinstance(name, str):
            section.fail(name, f"an engine arg name must be a string, got {_type(name)}")
        if name not in own:
            args[name] = value
    return args


def _parse_policy(section: _Reader) -> PolicySettings:
    d = PolicySettings()
    policy = PolicySettings(
        keep_alive_s=section.get("keep_alive", parse_duration, d.keep_alive_s),
        max_parked=section.get("max_parked", _count, d.max_parked),
        park_min_free_bytes=section.get("park_min_free_bytes", _count, d.park_min_free_bytes),
        host_cache_bytes=section.get("host_cache_bytes", _count, d.host_cache_bytes),
        queue_max=section.get("queue_max", _count, d.queue_max),
        queue_wait_s=section.get("queue_wait", parse_duration, d.queue_wait_s),
        drain_timeout_s=section.get("drain_timeout", parse_duration, d.drain_timeout_s),
        health_interval_s=section.get("health_interval", _positive_duration, d.health_interval_s),
        health_timeout_s=section.get("health_timeout", _positive_duration, d.health_timeout_s),
        restart_backoff_min_s=section.get("restart_backoff_min", _positive_duration, d.restart_backoff_min_s),
        restart_backoff_max_s=section.get("restart_backoff_max", _positive_duration, d.restart_backoff_max_s),
        worker_ready_timeout_s=section.get("worker_ready_timeout", _positive_duration, d.worker_ready_timeout_s),
        stop_timeout_s=section.get("stop_timeout", parse_duration, d.stop_timeout_s),
        restart_backoff_reset_s=section.get("restart_backoff_reset", _positive_duration,
                                            d.restart_backoff_reset_s),
        on_demand=section.get("on_demand", _bool, d.on_demand),
        min_resident_s=section.get("min_resident", parse_duration, d.min_resident_s),
        max_resident=section.get("max_resident", _positive_int, d.max_resident),
        worker_memory_bytes=section.get("worker_memory_bytes", _count, d.worker_memory_bytes),
        preempt_after_s=section.get("preempt_after", parse_duration, d.preempt_after_s),
        render_timeout_s=section.get("render_timeout", _positive_duration, d.render_timeout_s),
        step_timeout_s=section.get("step_timeout", _positive_duration, d.step_timeout_s),
    )
    if policy.restart_backoff_min_s > policy.restart_backoff_max_s:
        section.fail("restart_backoff_min", "must not exceed restart_backoff_max")
    return policy


# ---- values -----------------------------------------------------------------------


def _type(value: object) -> str:
    if value is None:
        return "null"
    return "mapping" if isinstance(value, dict) else type(value).__name__


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected str, got {_type(value)}")
    if not value:
        raise _Invalid("expected a non-empty string")
    return value


def _at(where: str, parse: Callable[[object], Any], value: object) -> Any:
    """parse(value), its error's key path continued by `where`."""
    try:
        return parse(value)
    except _Invalid as e:
        raise _Invalid(str(e), where + e.at) from None


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_type(value)}")
    return value


def _int(value: object) -> int:
    # bool is an int to Python, but `port: true` is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"expected int, got {_type(value)}")
    return value


def _count(value: object) -> int:
    number = _int(value)
    if number < 0:
        raise _Invalid(f"expected an int >= 0, got {number}")
    return number


def _positive_int(value: object) -> int:
    number = _int(value)
    if number < 1:
        raise _Invalid(f"expected an int >= 1, got {number}")
    return number


def _port(value: object) -> int:
    number = _int(value)
    if not 0 <= number <= 65535:
        raise _Invalid(f"expected a port in 0..65535, got {number}")
    return number


def _number(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Invalid(f"expected a duration (seconds, or text such as '5m'), got {_type(value)}")
    if not math.isfinite(value):
        raise _Invalid(f"expected a finite duration, got {value}")
    return float(value)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration_text(text: str) -> float:
    compact = text.replace(" ", "").lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise _Invalid(f"expected a duration such as 30, '30s', '5m' or '1h30m', got {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise _Invalid(f"expected a duration > 0, got {value!r}")
    return seconds


def _log_level(value: object) -> str:
    level = _text(value).lower()
    if level not in LOG_LEVELS:
        raise _Invalid(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return level


_DEVICE = re.compile(r"cpu|cuda:\d+")


def _device(value: object) -> str:
    device = _text(value)
    if not _DEVICE.fullmatch(device):
        raise _Invalid(f"expected 'cpu' or 'cuda:N', got {device!r}")
    return device


def _id_of(lookup: Callable[[str], Any], what: str) -> Callable[[object], int]:
    """A uid or gid given as a number or a name (names read better, and a
    static `wcd` group differs in number from host to host)."""

    def parse(value: object) -> int:
        if isinstance(value, str):
            try:
                return lookup(value)[2]
            except KeyError:
                raise _Invalid(f"no such {what}: {value!r}") from None
        return _count(value)

    return parse


def _list(value: object) -> list:
    if not isinstance(value, list):
        raise _Invalid(f"expected a list, got {_type(value)}")
    return value


def _list_of(parse: Callable[[object], Any]) -> Callable[[object], tuple]:
    def parse_list(value: object) -> tuple:
        items = []
        for index, item in enumerate(_list(value)):
            try:
                items.append(parse(item))
            except _Invalid as e:
                raise _Invalid(str(e), f"[{index}]{e.at}") from None
        return tuple(items)

    return parse_list


def _unique(parse_list: Callable[[object], tuple]) -> Callable[[object], tuple]:
    def parse(value: object) -> tuple:
        items = parse_list(value)
        for index, item in enumerate(items):
            if item in items[:index]:
                raise _Invalid(f"{item!r} is listed twice", f"[{index}]")
        return items

    return parse


def _alias_in(models: dict[str, ModelSettings]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        alias = _text(value)
        if alias not in models:
            raise _Invalid(f"unknown model {alias!r} (models: {', '.join(models) or 'none'})")
        return alias

    return parse


# ---- paths ------------------------------------------------------------------------


def _absolute(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def _path_under(base_dir: str) -> Callable[[object], str]:
    return lambda value: _absolute(_text(value), base_dir)


def _model_path(raw: str, base_dir: str, roots: tuple[str, ...]) -> str:
    readings = [_absolute(raw, base_dir)]
    if roots and not os.path.isabs(os.path.expanduser(raw)):
        readings.append(_absolute(raw, roots[0]))
    for usable in (os.path.exists, lambda path: _inside_roots(path, roots)):
        for path in readings:
            if usable(path):
                return path
    return readings[0]


def _inside_roots(path: str, roots: tuple[str, ...]) -> bool:
    real = os.path.realpath(path)
    return any(_within(real, os.path.realpath(root)) for root in roots)


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root
