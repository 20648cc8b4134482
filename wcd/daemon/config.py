"""etc/wcd.yaml -> validated, typed, frozen settings.

The daemon checks its own keys and types here, at start, so a typo fails
`wcd --check-config` (and the start) with one line naming the file and the
dotted key, instead of surfacing later as a mysterious runtime behaviour.
The settings are msgspec structs, and msgspec checks the keys and types
while it converts the YAML tree; this module adds what msgspec cannot:
duplicate keys, durations, paths, user and group names, checks across keys,
and the one-line error. vLLM engine args (`defaults` and model entries)
pass through untouched: vLLM is the authority on them and the worker checks
them at load.

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
from typing import Annotated, Any, Callable, Literal, NoReturn

import msgspec
import yaml
from msgspec import Meta, field
from msgspec.structs import replace

from wcd import control_socket

SYSTEM_CONFIG = "/etc/wcd/wcd.yaml"
BUILTIN_SOURCE = "<built-in defaults>"


class ConfigError(Exception):
    """One line: `<file>: <dotted key>: <problem>` (the key is left out when the
    problem is with the file as a whole)."""

    def __init__(self, problem: str, *, source: str | None = None, key: str | None = None):
        text = ": ".join(part for part in (source, key, problem) if part)
        super().__init__(" ".join(text.split()))
        self.problem = problem
        self.source = source
        self.key = key


# ---- values msgspec cannot read alone -------------------------------------------


class _Plain(type):
    """msgspec hands a field of these types to `_Reading.decode`, then checks
    what it returns against the type: their values are plain floats, strs and
    ints (msgspec encodes no subclass, and settings travel to workers)."""

    def __instancecheck__(cls, value: object) -> bool:
        return type(value) in cls.__mro__


class Duration(float, metaclass=_Plain):
    """Seconds >= 0: a number, or text such as "30s"."""


class PositiveDuration(Duration):
    """A duration > 0."""


class ConfigPath(str, metaclass=_Plain):
    """A path; a relative one resolves against the config file's directory."""


class UserId(int, metaclass=_Plain):
    """A uid, or a user's name (names read better, and a static `wcd` group
    differs in number from host to host)."""


class GroupId(int, metaclass=_Plain):
    """A gid, or a group's name."""


Text = Annotated[str, Meta(min_length=1)]
Count = Annotated[int, Meta(ge=0)]
Positive = Annotated[int, Meta(ge=1)]


# ---- settings -------------------------------------------------------------------


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A mapping of the file; a field's `name=` is its key where the
    attribute also says the unit."""


class ControlSettings(_Section):
    socket: ConfigPath = field(default_factory=control_socket.daemon_default)
    allow_uids: tuple[UserId, ...] = ()
    allow_gids: tuple[GroupId, ...] = ()


class ApiKey(_Section):
    """A key limited to some models: the names (aliases or paths) it may use."""

    key: Text
    models: tuple[Text, ...] = ()


class HttpSettings(_Section):
    host: Text = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    # As the file lists them, then those of $WCD_API_KEYS.
    api_keys: tuple[Text | ApiKey, ...] = ()
    # What one request may ask for; past these a client gets 413 or 400.
    max_body_bytes: Positive = 8 << 20
    max_prompts: Positive = 64  # prompts in one completions request
    max_choices: Positive = 128  # prompts x n
    max_sampling_bytes: Positive = 1 << 20  # sampling fields and chat_template_kwargs, encoded
    # Connections: a stream write that waits longer on its client aborts the
    # request; idle keep-alive and a request head that does not arrive in time
    # close the connection; past max_connections new ones are closed at once.
    write_timeout_s: PositiveDuration = field(default=30.0, name="write_timeout")
    keepalive_timeout_s: PositiveDuration = field(default=15.0, name="keepalive_timeout")
    header_timeout_s: PositiveDuration = field(default=10.0, name="header_timeout")
    max_connections: Positive = 1024
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

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every bearer token accepted, each once."""
        return tuple(dict.fromkeys(key if isinstance(key, str) else key.key
                                   for key in self.api_keys))

    @property
    def key_models(self) -> dict[str, tuple[str, ...]]:
        """Keys limited to some models: key -> the names it may use."""
        return {key.key: key.models for key in self.api_keys
                if isinstance(key, ApiKey) and key.models}


class WorkerSettings(_Section):
    """One worker, or with tensor_parallel_size N > 1 a group of N processes
    (on CUDA, devices cuda:K .. cuda:K+N-1 for device cuda:K), serving models
    of the tensor-parallel sizes in `serves` (default N alone)."""

    device: Annotated[str, Meta(pattern="^(cpu|cuda:[0-9]+)$")] = "cpu"
    tensor_parallel_size: Positive = 1
    serves_tensor_parallel_sizes: tuple[Positive, ...] = ()

    @property
    def serves(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.serves_tensor_parallel_sizes))) or (self.tensor_parallel_size,)

    @property
    def kind(self) -> str:
        return self.device.split(":", 1)[0]

    @property
    def cuda_indices(self) -> tuple[int, ...]:
        if self.kind != "cuda":
            return ()
        first = int(self.device.split(":", 1)[1])
        return tuple(range(first, first + self.tensor_parallel_size))


class ModelSettings(msgspec.Struct, frozen=True):
    """A model's entry: wcd's keys are these fields; every other key is an
    engine arg."""

    name: str
    path: Text
    # None: policy.keep_alive applies.
    keep_alive_s: Duration | None = field(default=None, name="keep_alive")
    engine_args: dict[str, Any] = {}
    # vLLM's parsers of the model's chat output (vllm serve's --tool-call-parser
    # with --enable-auto-tool-choice, and --reasoning-parser); None: none.
    tool_call_parser: Text | None = None
    reasoning_parser: Text | None = None


class PolicySettings(_Section):
    # Idle models are unloaded after this; 0: kept for ever.
    keep_alive_s: Duration = field(default=0.0, name="keep_alive")
    max_parked: Count = 0  # swapped-out engines kept on each worker's device
    park_min_free_bytes: Count = 2 << 30  # parked engines yield to keep this free
    host_cache_bytes: Count = 0
    # The host cache's disk tier: snapshots also written here, read back after
    # a restart instead of vLLM's loader (null: $CACHE_DIRECTORY/snapshots under
    # systemd, else none), within disk_cache_bytes (0: no disk tier).
    disk_cache_dir: ConfigPath | None = field(default_factory=lambda: _default_disk_cache_dir())
    disk_cache_bytes: Count = 64 << 30
    queue_max: Count = 64  # requests waiting for a model, per model
    # The longest a request waits for its model before 503.
    queue_wait_s: Duration = field(default=60.0, name="queue_wait")
    drain_timeout_s: Duration = field(default=30.0, name="drain_timeout")
    health_interval_s: PositiveDuration = field(default=5.0, name="health_interval")
    health_timeout_s: PositiveDuration = field(default=10.0, name="health_timeout")
    restart_backoff_min_s: PositiveDuration = field(default=1.0, name="restart_backoff_min")
    restart_backoff_max_s: PositiveDuration = field(default=60.0, name="restart_backoff_max")
    worker_ready_timeout_s: PositiveDuration = field(default=300.0, name="worker_ready_timeout")
    stop_timeout_s: Duration = field(default=20.0, name="stop_timeout")
    # A worker that stayed up this long restarts after the minimum backoff again.
    restart_backoff_reset_s: PositiveDuration = field(default=300.0, name="restart_backoff_reset")
    # Whether an OpenAI request may load a model that no worker serves.
    on_demand: bool = True
    # How long a model stays before an OpenAI request may evict it (wcctl may always).
    min_resident_s: Duration = field(default=5.0, name="min_resident")
    # Models a worker keeps resident and steps side by side (a tensor-parallel
    # group: one), and the bytes their footprints may take on it (0: 90% of
    # the device's memory; the host's available memory on CPU).
    max_resident: Positive = 4
    worker_memory_bytes: Count = 0
    # How long busy residents may keep a waiting model out before one of
    # them is suspended (its requests paused, resumed later) to make room.
    preempt_after_s: Duration = field(default=2.0, name="preempt_after")
    # A chat template render on a worker's main thread that runs longer is
    # aborted (the request gets 400); an engine step that runs longer restarts
    # the worker: nothing may hold a worker silently.
    render_timeout_s: PositiveDuration = field(default=10.0, name="render_timeout")
    step_timeout_s: PositiveDuration = field(default=120.0, name="step_timeout")
    # On CUDA a build captures vLLM's CUDA graphs of batches up to this many
    # tokens before the model serves, the rest one by one while it is idle
    # (0: all first, as vLLM does).
    first_graph_tokens: Count = 16


class _File(_Section):
    """The file as written. `defaults` and `models` hold engine args, which
    only vLLM judges: `_Reading` reads them."""

    control: ControlSettings = field(default_factory=ControlSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    workers: Annotated[tuple[WorkerSettings, ...], Meta(min_length=1)] = (WorkerSettings(),)
    model_roots: tuple[ConfigPath, ...] = ()
    defaults: dict = {}
    models: dict = {}
    preload: tuple[Text, ...] = ()
    policy: PolicySettings = field(default_factory=PolicySettings)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # A wcd-forkserver's socket: workers are forked there, their imports
    # done (null: $RUNTIME_DIRECTORY/forkserver.sock under systemd, else none;
    # no forkserver listening there: the daemon execs them).
    forkserver: ConfigPath | None = field(default_factory=lambda: _default_forkserver())


class Settings(msgspec.Struct, frozen=True):
    control: ControlSettings
    http: HttpSettings
    workers: tuple[WorkerSettings, ...]
    model_roots: tuple[str, ...]
    defaults: dict
    models: dict[str, ModelSettings]
    preload: tuple[str, ...]
    policy: PolicySettings
    log_level: str
    source: str | None  # None: built-in defaults
    forkserver: str | None = None

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


def _default_disk_cache_dir() -> str | None:
    """systemd's CacheDirectory= (the unit's /var/cache/wcd), if it gave one."""
    cache = os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    return os.path.join(cache, "snapshots") if cache else None


def _default_forkserver() -> str | None:
    """Where wcd-forkserver.socket listens: systemd's RuntimeDirectory=."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(runtime, "forkserver.sock") if runtime else None


def _log_level_lowered(data: object) -> object:
    """`log_level: INFO` reads as Python's logging and journald spell it."""
    if isinstance(data, dict) and isinstance(data.get("log_level"), str):
        return {**data, "log_level": data["log_level"].lower()}
    return data


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
    return _Reading(source).settings(data)


def parse_duration(value: object) -> float:
    """Seconds from a number or text such as "30s", "5m", "1h30m"; ValueError if
    neither."""
    if isinstance(value, str):
        return _duration_text(value)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"expected a duration >= 0 (seconds, or text such as '5m'), "
                         f"got {value!r}")
    return float(value)


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


def _without_nulls(value: object, keep: tuple[str, ...] = ("defaults", "models")) -> object:
    """A key set to null takes its default, where msgspec would refuse the
    null; engine args (under `keep`) keep theirs, for vLLM."""
    if isinstance(value, dict):
        return {k: v if k in keep else _without_nulls(v, ()) for k, v in value.items()
                if v is not None}
    if isinstance(value, list):
        return [_without_nulls(item, ()) for item in value]
    return value


# ---- msgspec's checks, as one line --------------------------------------------------

# "<problem> - at `$.http.port`", or "- at `key` in `$.http`" for a mapping's key.
_WHERE = re.compile(r"(?s)(?P<problem>.*?)(?: - at `(?:key` in `)?\$(?P<at>[^`]*)`)?")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`")
_MISSING = re.compile(r"Object missing required field `(.*)`")
_ENUM = re.compile(r"Invalid enum value (.*)")
_TYPE_WORDS = {"object": "mapping", "array": "list"}  # as YAML calls them


def _config_error(message: str, schema: Any, source: str, key: str) -> ConfigError:
    where = _WHERE.fullmatch(message)
    problem, at = where["problem"], where["at"] or ""
    key += at
    if unknown := _UNKNOWN.fullmatch(problem):
        known = ", ".join(f.encode_name for f in _type_at(schema, at).fields)
        problem, key = f"unknown key (known here: {known})", f"{key}.{unknown[1]}"
    elif missing := _MISSING.fullmatch(problem):
        problem, key = "required", f"{key}.{missing[1]}"
    elif enum := _ENUM.fullmatch(problem):
        choices = ", ".join(_type_at(schema, at).values)
        problem = f"expected one of {choices}, got {enum[1]}"
    else:
        # A null is a key's default and never wrong, so not worth saying.
        problem = problem.replace("`", "").replace(" | null", "")
        problem = re.sub(r"\b(object|array)\b", lambda m: _TYPE_WORDS[m[0]], problem)
        problem = problem[:1].lower() + problem[1:]
    return ConfigError(problem, source=source, key=key.lstrip(".") or None)


def _type_at(schema: Any, at: str) -> msgspec.inspect.Type:
    """The type msgspec read at `at` (`.http.api_keys[0]`), for a hint."""
    node = msgspec.inspect.type_info(schema)
    for name in re.findall(r"\.(\w+)|\[\d+\]", at):
        node = _mapping_in(node)
        node = next(f.type for f in node.fields if f.encode_name == name) if name else node.item_type
    return _mapping_in(node)


def _mapping_in(node: msgspec.inspect.Type) -> msgspec.inspect.Type:
    """`str | ApiKey`'s mapping: the struct."""
    if isinstance(node, msgspec.inspect.UnionType):
        return next(t for t in node.types if isinstance(t, msgspec.inspect.StructType))
    return node


# ---- what msgspec cannot check ------------------------------------------------------

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
_MODEL_KEYS = frozenset(f.encode_name for f in msgspec.structs.fields(ModelSettings)
                        if f.name not in ("name", "engine_args"))


class _Reading:
    """One file read into settings: msgspec's conversion, then the checks it
    cannot make, every error naming the file and the key."""

    def __init__(self, source: str):
        self.source = source
        self.base_dir = os.path.dirname(os.path.abspath(source))

    def settings(self, data: object) -> Settings:
        file = self.convert(_log_level_lowered(_without_nulls(data)), _File, "")
        models = {alias: self.model(alias, entry, file.model_roots)
                  for alias, entry in file.models.items()}
        from_env = (key.strip() for key in os.environ.get("WCD_API_KEYS", "").split(","))
        return Settings(
            control=file.control,
            http=replace(file.http, api_keys=tuple(dict.fromkeys(
                (*file.http.api_keys, *(key for key in from_env if key))))),
            workers=self.workers(file.workers),
            model_roots=file.model_roots,
            defaults=self.engine_args(file.defaults, "defaults", _NOT_DEFAULTS),
            models=models,
            preload=self.preload(file.preload, models),
            policy=self.policy(file.policy),
            log_level=file.log_level,
            source=self.source,
            forkserver=file.forkserver,
        )

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(problem, source=self.source, key=key)

    def convert(self, value: object, schema: Any, key: str) -> Any:
        """`value` as `schema`; an error names `key` and where below it."""
        try:
            return msgspec.convert(value, schema, dec_hook=self.decode)
        except msgspec.ValidationError as e:
            raise _config_error(str(e), schema, self.source, key) from None

    def decode(self, kind: type, value: object) -> object:
        if kind is Duration:
            return parse_duration(value)
        if kind is PositiveDuration:
            seconds = parse_duration(value)
            if seconds <= 0:
                raise ValueError(f"expected a duration > 0, got {value!r}")
            return seconds
        if kind is ConfigPath:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {value!r}")
            return _absolute(value, self.base_dir)
        if kind is UserId:
            return _id(value, pwd.getpwnam, "user")
        if kind is GroupId:
            return _id(value, grp.getgrnam, "group")
        raise NotImplementedError(kind)

    def workers(self, workers: tuple[WorkerSettings, ...]) -> tuple[WorkerSettings, ...]:
        taken: set[int] = set()
        for index, worker in enumerate(workers):
            size = worker.tensor_parallel_size
            above = sorted(m for m in worker.serves_tensor_parallel_sizes if m > size)
            if above:
                self.fail(f"workers[{index}].serves_tensor_parallel_sizes",
                          f"sizes above the worker's tensor_parallel_size {size}: {above}")
            if taken & set(worker.cuda_indices):
                self.fail(f"workers[{index}].device", f"cuda:{min(taken & set(worker.cuda_indices))}"
                                                      " is given to another worker already")
            taken.update(worker.cuda_indices)
        return workers

    def policy(self, policy: PolicySettings) -> PolicySettings:
        if policy.restart_backoff_min_s > policy.restart_backoff_max_s:
            self.fail("policy.restart_backoff_min", "must not exceed restart_backoff_max")
        return policy

    def preload(self, preload: tuple[str, ...], models: dict[str, ModelSettings]) -> tuple[str, ...]:
        for index, alias in enumerate(preload):
            if alias not in models:
                self.fail(f"preload[{index}]", f"unknown model {alias!r} "
                                               f"(models: {', '.join(models) or 'none'})")
            if alias in preload[:index]:
                self.fail(f"preload[{index}]", f"{alias!r} is listed twice")
        return preload

    def engine_args(self, args: dict, key: str, refused: dict[str, str]) -> dict:
        """`args` as they are, but for names that are not vLLM's."""
        refused = {**_NOT_ENGINE_ARGS, **refused}
        for name in args:
            if name in refused:
                self.fail(f"{key}.{name}", refused[name])
            if not isinstance(name, str):
                self.fail(f"{key}.{name}", "an engine arg name must be a string, "
                                           f"got {type(name).__name__}")
        return args

    def model(self, alias: object, entry: object, roots: tuple[str, ...]) -> ModelSettings:
        key = f"models.{alias}"
        if not isinstance(alias, str) or not alias or any(c.isspace() for c in alias):
            self.fail(key, "a model alias must be a non-empty string without spaces")
        entry = self.convert(entry, dict, key)
        own = {name: value for name, value in entry.items()
               if name in _MODEL_KEYS and value is not None}
        args = {name: value for name, value in entry.items() if name not in _MODEL_KEYS}
        model = self.convert({**own, "name": alias, "engine_args": self.engine_args(args, key, {})},
                             ModelSettings, key)
        if not roots:
            self.fail(f"{key}.path", "no model_roots are configured, and a model must lie inside one")
        path = _model_path(model.path, self.base_dir, roots)
        if not _inside_roots(path, roots):
            self.fail(f"{key}.path", f"{path} is outside every model root ({', '.join(roots)})")
        return replace(model, path=path)


# ---- values -----------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration_text(text: str) -> float:
    compact = text.replace(" ", "").lower()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(f"expected a duration such as 30, '30s', '5m' or '1h30m', got {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _id(value: object, lookup: Callable[[str], Any], what: str) -> int:
    if isinstance(value, str):
        try:
            return lookup(value)[2]
        except KeyError:
            raise ValueError(f"no such {what}: {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a {what} name or an id >= 0, got {value!r}")
    return value


# ---- paths ------------------------------------------------------------------------


def _absolute(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


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
