"""The worker protocol: the only contract between the daemon and a worker.

Frames on a socketpair: a 4-byte big-endian length, then one msgpack-encoded
struct. The daemon's first frame is the worker's `Setup`, the worker's first
is `Ready`; each side refuses the other's first frame when its
`protocol_version` is not its own. Then commands flow daemon -> worker, events
worker -> daemon. Failures travel as `ErrorInfo` data, never as pickled
exceptions. A forkserver, when the daemon uses one, speaks the same framing:
`ForkWorker` in, `WorkerForked` or `ForkRefused`, later `WorkerExited` out.
This module imports only msgspec and the stdlib so the daemon can share it.
"""

from __future__ import annotations

import struct
from typing import Any, Literal, Union

import msgspec
from msgspec import UNSET, UnsetType

PROTOCOL_VERSION = 11
_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024
# A worker's exit code when the daemon's Setup is of another protocol version
# (sysexits' EX_PROTOCOL), so that a daemon of any version can tell why.
EXIT_VERSION_MISMATCH = 76


class Setup(msgspec.Struct, frozen=True):
    """The daemon's first frame to a worker: everything it is, before it
    imports torch and vLLM. `tensor_parallel_size` > 1: it leads a group of
    that many processes; `host_cache_bytes`: the budget of its weight
    snapshots; `max_parked`, `park_min_free_bytes`: the swapped-out engines it
    keeps on its device, and the free memory they yield to;
    `render_timeout_s`: a render past it is interrupted; `step_timeout_s`: a
    step past it ends the worker; `disk_cache_dir`, `disk_cache_bytes`: the
    host cache's disk tier (None or 0: none); `first_graph_tokens`: a CUDA
    build captures the graphs of batches up to this many tokens, the rest while
    the model is idle (0: all at build)."""

    index: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    tensor_parallel_size: int = 1
    host_cache_bytes: int = 0
    max_parked: int = 0
    park_min_free_bytes: int = 0
    render_timeout_s: float = 10.0
    step_timeout_s: float = 120.0
    disk_cache_dir: str | None = None
    disk_cache_bytes: int = 0
    first_graph_tokens: int = 0
    protocol_version: int = PROTOCOL_VERSION


class ModelSpec(msgspec.Struct, frozen=True):
    """What to load: the served name, a local directory and vLLM engine args.
    `root`: the model root the directory must lie beneath, checked again by
    the worker when it opens the files ("" for none).
    `tool_call_parser`, `reasoning_parser`: the vLLM parsers the worker runs
    on the model's chat output, as `vllm serve --enable-auto-tool-choice
    --tool-call-parser X --reasoning-parser Y` does (None: none)."""

    name: str
    path: str
    engine_args: dict[str, Any] = {}
    root: str = ""
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


class ErrorInfo(msgspec.Struct, frozen=True):
    """A failure as data. `kind` is one of the ERROR_KINDS below; `param`: the
    request field a refusal is about, where vLLM's server names one (the
    daemon words it as the workers' vLLM does)."""

    kind: str
    message: str
    param: str | None = None


# Error kinds, mapped to HTTP statuses and exit codes at the daemon's edge.
# The worker chooses one by the type of the exception it caught.
BAD_MODEL = "bad_model"  # files, config (its architecture...) or engine args vLLM cannot serve
BAD_ARGS = "bad_args"  # a request vLLM refused, or an engine arg it does not have
OUT_OF_MEMORY = "out_of_memory"
NOT_LOADED = "not_loaded"  # the request names a model this worker is not serving
UNSUPPORTED = "unsupported"  # the model does not do the request's task (generate, embed)
ABORTED = "aborted"  # the request was aborted (client gone, drain timeout)
BUSY = "busy"  # another load/swap is running
INTERNAL = "internal"  # none of the above: the worker's own, logged with its traceback
GONE = "gone"  # the worker exited or its socket broke (set by the daemon)
ERROR_KINDS = (BAD_MODEL, BAD_ARGS, OUT_OF_MEMORY, NOT_LOADED, UNSUPPORTED, ABORTED, BUSY,
               INTERNAL, GONE)


# ---- commands: daemon -> worker -------------------------------------------------


class Swap(msgspec.Struct, tag="swap", frozen=True):
    """Make `model` resident: served beside the worker's other residents.

    The residents named in `replace` leave first (drained: their requests
    finish, bounded by `drain_timeout_s`, or are aborted when `force`), while
    every other resident keeps serving. A model of the same shape as the one
    resident it replaces reloads in place; a parked one unparks; a suspended
    one resumes, its requests continuing where they stopped."""

    op_id: int
    model: ModelSpec
    replace: list[str] = []
    drain_timeout_s: float = 30.0
    force: bool = False


class Unload(msgspec.Struct, tag="unload", frozen=True):
    """The residents named in `models` leave (drained as for Swap), parked
    where the worker's parking policy allows, else released."""

    op_id: int
    models: list[str]
    drain_timeout_s: float = 30.0
    force: bool = False


class Suspend(msgspec.Struct, tag="suspend", frozen=True):
    """Make room without losing work: at a step boundary the resident stops
    being stepped, the KV blocks its requests hold are copied to host memory
    and its KV cache is released (kept where full CUDA graphs captured its
    addresses); its weights stay. A Swap of the same model resumes it: the
    blocks go back to the same ids and its requests continue exactly where
    they stopped, with the output they would have had."""

    op_id: int
    model: str


class Prompt(msgspec.Struct, frozen=True, omit_defaults=True):
    """One input of a request. Exactly one field is set."""

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None


# apply_chat_template arguments that are not template variables: the worker
# sets them itself, and a request's chat_template_kwargs may not (a client's
# `chat_template` would run its own Jinja code in the worker).
RESERVED_CHAT_TEMPLATE_KWARGS = frozenset({
    "chat_template", "tools", "documents", "tokenize", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "add_generation_prompt", "continue_final_message",
    "padding", "truncation", "max_length", "conversation", "tokenizer_kwargs"})


class RenderOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """How prompts become tokens: the fields of vLLM's TokenizeParams and
    ChatParams a request may set, under vLLM's names. None: the endpoint's
    default (special tokens are added to completion prompts, not to chats,
    whose template writes its own)."""

    add_special_tokens: bool | None = None
    truncate_prompt_tokens: int | None = None
    truncation_side: str | None = None
    # A pooling request's, as TokenizeParams.with_kwargs takes it.
    padding: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None
    # The output length the request asked for, under the name it used (0:
    # none), which bounds truncation and (0.26) the prompt, as vLLM's
    # build_tok_params sets them.
    max_output_tokens: int = 0
    max_output_tokens_param: str = "max_tokens"


class ChatOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """A chat request's tool calling and reasoning fields, under vLLM's names
    and with its defaults, for the model's parsers; the tools themselves are
    `RenderOptions.tools`, which the chat template sees too. `tool_choice`:
    "none", "auto", "required", a named function ({"type": "function",
    "function": {"name": ...}}), or None where the client sent null.
    `stream`: parsed delta by delta (vLLM's parse_delta) rather than whole at
    the end; `continuous_usage`: reasoning tokens counted at every Output."""

    tool_choice: str | dict[str, Any] | None = "none"
    parallel_tool_calls: bool | None = True
    include_reasoning: bool = True
    stream: bool = False
    continuous_usage: bool = False


class BeamSearch(msgspec.Struct, frozen=True):
    """vLLM's use_beam_search: each prompt's completions are its best beams,
    searched as vLLM's online server searches them. Its BeamSearchParams are
    made from the request's `sampling` as vLLM's to_beam_search_params makes
    them (beam width n, temperature, max_tokens, ignore_eos,
    include_stop_str_in_output, skip_special_tokens); the other sampling
    fields do not apply, as in vLLM."""

    length_penalty: float = 1.0


class Generate(msgspec.Struct, tag="generate", frozen=True):
    """One request: one prompt, or a batch sharing one `sampling`. The worker
    streams `Output`s tagged with the prompt's index.

    `sampling` holds vLLM SamplingParams fields; the worker validates them
    with vLLM's own SamplingParams, so the daemon never needs vLLM.
    `chat_template` is set only where the operator trusts request templates.
    `return_prompt`: each prompt's first Output carries its `PromptInfo`.
    `chat`: set on chat requests, whose output the model's parsers parse.
    `beam_search`: set where the request asked for it (vLLM's use_beam_search).
    """

    request_id: str
    model: str
    prompts: list[Prompt]
    sampling: dict[str, Any] = {}
    chat_template_kwargs: dict[str, Any] = {}
    chat_template: str | None = None
    render: RenderOptions = RenderOptions()
    return_prompt: bool = False
    chat: ChatOptions | None = None
    beam_search: BeamSearch | None = None


class Tokenize(msgspec.Struct, tag="tokenize", frozen=True):
    """A prompt to tokens as `model` renders it, without generating: vLLM's
    /tokenize. Answered by `Tokenized`, or `OpFailed`."""

    op_id: int
    model: str
    prompt: Prompt
    render: RenderOptions = RenderOptions()
    chat_template_kwargs: dict[str, Any] = {}
    chat_template: str | None = None
    return_token_strs: bool = False


class Detokenize(msgspec.Struct, tag="detokenize", frozen=True):
    """Token ids to text with `model`'s tokenizer: vLLM's /detokenize.
    Answered by `Detokenized`, or `OpFailed`."""

    op_id: int
    model: str
    token_ids: list[int]


# vLLM's encodings of a pooled vector (vllm/utils/serial_utils.py, checked by
# vllm_seams.check): its dtype, and its byte order, "native" the host's.
EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
Endianness = Literal["native", "big", "little"]


class Embed(msgspec.Struct, tag="embed", frozen=True):
    """One embeddings request for a pooling model: one input (text, token ids
    or a chat's messages) or a batch sharing one `pooling`. The worker answers
    an `Embedding` per input, the request's last one `finished`.

    `pooling` holds vLLM PoolingParams fields (dimensions, use_activation),
    validated by vLLM's own PoolingParams in the worker; `render` and the
    chat template fields say how inputs become tokens, as vLLM's embeddings
    server renders them (its `add_special_tokens` always set: True for text
    and token ids, False for chats by default). `chat_template` is set only
    where the operator trusts request templates.

    `endpoint`: the vLLM endpoint asked (one of EMBED_ENDPOINTS), whose
    refusals and input length limit the worker applies, as vLLM's server
    does for it; `task`: /pooling's, checked against the model's pooling
    task in vLLM's words (None: the model's); `score`: a score or rerank
    request's two sides, whose items are the inputs (`prompts` empty).
    `embed_dtype` and `endianness`: how each Embedding's vector crosses,
    encoded by vLLM's own tensor2binary, since only the worker has the dtypes
    (bfloat16, fp8).
    """

    request_id: str
    model: str
    prompts: list[Prompt]
    pooling: dict[str, Any] = {}
    render: RenderOptions = RenderOptions(add_special_tokens=True, add_generation_prompt=False)
    chat_template_kwargs: dict[str, Any] = {}
    chat_template: str | None = None
    endpoint: str = "embeddings"
    task: str | None = None
    score: ScoreInputs | None = None
    embed_dtype: EmbedDType = "float32"
    endianness: Endianness = "native"


# The endpoints an Embed may come from, by vLLM's name for each in its refusals.
EMBED_ENDPOINTS = {"embeddings": "Embeddings API", "pooling": "Pooling API",
                   "score": "Score API", "rerank": "Rerank (Score) API"}


class ScoreInputs(msgspec.Struct, frozen=True, omit_defaults=True):
    """A score or rerank request's two sides as vLLM's bi-encoder scoring
    takes them: each item a text or a multi-modal {"content": [...]}, which
    the worker refuses in vLLM's words for a text-only model. The worker
    checks and truncates them as vLLM does (0: no limit) and embeds data_1's
    items, then data_2's, as the Embed's inputs."""

    data_1: list[Any]
    data_2: list[Any]
    max_tokens_per_query: int = 0
    max_tokens_per_doc: int = 0


class Similarity(msgspec.Struct, tag="similarity", frozen=True):
    """The cosine similarity of each pair of vectors (float32 bytes, as an
    Embedding's), computed as vLLM's bi-encoder scoring computes it, so a
    score is to the bit the one vLLM's server sends. Answered by
    `Similarities`."""

    op_id: int
    pairs: list[tuple[bytes, bytes]]


class Abort(msgspec.Struct, tag="abort", frozen=True):
    request_id: str


class GetStats(msgspec.Struct, tag="get_stats", frozen=True):
    op_id: int


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Answered by the worker's reader thread, even while an engine builds."""

    seq: int


class Shutdown(msgspec.Struct, tag="shutdown", frozen=True):
    pass


Command = Union[Swap, Unload, Suspend, Generate, Embed, Tokenize, Detokenize, Similarity, Abort,
                GetStats, Ping, Shutdown]


# ---- events: worker -> daemon ---------------------------------------------------


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Sent once, after torch and vLLM are imported and the device initialised.
    `memory_bytes`: what its residents may use at most: the device's memory
    (CUDA), or the host's available memory at start (CPU)."""

    pid: int
    device: str
    protocol_version: int
    vllm_version: str
    torch_version: str
    startup_s: float
    group_pids: list[int] = []  # the followers of a tensor-parallel group
    memory_bytes: int = 0


class CachedModel(msgspec.Struct, frozen=True):
    """A model a worker holds besides its residents: a snapshot in its host
    cache, or a parked engine on its device."""

    name: str
    bytes: int


class Resident(msgspec.Struct, frozen=True):
    """A model a worker serves. `bytes`: its footprint on the device, its
    weights plus its KV cache (while suspended: its weights, plus its kept
    blocks on CPU, plus the KV cache where CUDA graphs hold its addresses);
    `running`: its requests in the engine; `suspended`: by Suspend, waiting
    for a Swap to resume it; `kv_usage`: the fraction of its KV cache blocks
    in use (vLLM's kv_cache_usage_perc); `fingerprint`: the system_fingerprint
    vLLM's server would put on its answers (None where it cannot say); `rank`:
    in a tensor-parallel group, the rank whose device runs a TP=1 model."""

    name: str
    bytes: int
    running: int = 0
    suspended: bool = False
    kv_usage: float = 0.0
    # vLLM's CacheConfig.metrics_info() (vllm:cache_config_info's labels)
    cache_config: dict[str, str] = {}
    fingerprint: str | None = None
    rank: int = 0


class Pong(msgspec.Struct, tag="pong", frozen=True):
    seq: int
    residents: list[Resident]  # in the order they came in
    busy: str | None  # the operation under way ("swap", "unload", "suspend"), if any
    cached: list[CachedModel] = []  # the host cache, most recently used last
    device_bytes: int = 0  # torch.cuda.memory_allocated(); 0 on CPU
    parked: list[CachedModel] = []  # engines parked on the device, oldest first


class Phase(msgspec.Struct, tag="phase", frozen=True):
    """Progress of a swap/unload: one phase finished after `seconds`."""

    op_id: int
    phase: str
    seconds: float


class OpDone(msgspec.Struct, tag="op_done", frozen=True):
    """A swap/unload/suspend finished. `path` is "same_shape", "rebuild",
    "unpark", "resume", "noop", "unload" or "suspend"; `weights` where the
    weights came from: "host_cache", "snapshot_file" (its disk tier), "disk"
    (the checkpoint) or "parked" (on the device).
    `residents`: what the worker serves now."""

    op_id: int
    model: str | None
    path: str
    phases: dict[str, float]
    total_s: float
    residents: list[Resident] = []
    weights: str | None = None


class OpFailed(msgspec.Struct, tag="op_failed", frozen=True):
    """A swap/unload/suspend failed; `residents`: what the worker serves now
    (those it served before, brought back where they had to leave)."""

    op_id: int
    error: ErrorInfo
    residents: list[Resident] = []
    phases: dict[str, float] = {}


# One candidate token at a prompt position: token id, its text (None where
# vLLM did not detokenize it), logprob, rank in the vocabulary.
PromptLogprob = tuple[int, "str | None", float, "int | None"]


class PromptInfo(msgspec.Struct, frozen=True):
    """A prompt as the engine saw it, for echo and return_token_ids.
    `logprobs` (when sampling asked for prompt_logprobs): per position, None
    for the first token, else the prompt's own token and the top ones."""

    token_ids: list[int]
    text: str
    logprobs: list[list[PromptLogprob] | None] | None = None
    first_token: str = ""  # the first token's text, which has no logprob entry


# What vLLM's parsers make of a chat completion. The deltas keep vLLM's
# distinction between a field left unset (absent from its JSON) and one set
# to None (null), so the daemon writes a chunk exactly as vLLM's server does.


class FunctionDelta(msgspec.Struct, frozen=True):
    name: str | None | UnsetType = UNSET
    arguments: str | None | UnsetType = UNSET


class ToolCallDelta(msgspec.Struct, frozen=True):
    """vLLM's DeltaToolCall."""

    index: int
    id: str | None | UnsetType = UNSET
    type: str | None | UnsetType = UNSET
    function: FunctionDelta | None | UnsetType = UNSET


class MessageDelta(msgspec.Struct, frozen=True):
    """vLLM's DeltaMessage, as one streamed chunk carries it (an empty
    tool_calls is absent there too)."""

    content: str | None | UnsetType = UNSET
    reasoning: str | None | UnsetType = UNSET
    tool_calls: list[ToolCallDelta] | UnsetType = UNSET


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: str  # JSON text


class ParsedMessage(msgspec.Struct, frozen=True):
    """A whole completion parsed (vLLM's Parser.parse): what the chat
    response's message is made of."""

    content: str | None
    reasoning: str | None
    tool_calls: list[ToolCall] = []


class Parsed(msgspec.Struct, frozen=True, omit_defaults=True):
    """The model's parsers on an Output: streamed, `delta` is what vLLM's
    parse_delta made of its tokens (None: held back, as a partial tag);
    not streamed, the completion's last Output has `message`.
    `reasoning_tokens`: the completion's so far, with a reasoning parser, on
    its last Output and, with ChatOptions.continuous_usage, on every one.
    `error`: the parser failed; the request fails with it."""

    delta: MessageDelta | None = None
    message: ParsedMessage | None = None
    reasoning_tokens: int | None = None
    error: str | None = None


class Output(msgspec.Struct, tag="output", frozen=True):
    """New tokens of one completion (`index` < n) of one prompt since its last
    Output, streamed as vLLM produces them. `finished` is set on the request's
    last Output, once every prompt's completions are done."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    finished: bool = False
    # Per new token: {"token_id", "token", "logprob", "top": [[token_id, token, logprob], ...]},
    # the top in vLLM's order (the sampled token first, then by rank).
    logprobs: list[dict[str, Any]] | None = None
    prompt_index: int = 0
    prompt: PromptInfo | None = None
    parsed: Parsed | None = None  # chat requests to a model with parsers


class Embedding(msgspec.Struct, tag="embedding", frozen=True):
    """The pooled vector of one input of an Embed, in the Embed's embed_dtype
    and endianness, exactly the bytes vLLM's base64 and bytes encodings send
    (float32 in the host's byte order by default: daemon and worker share the
    host). `shape`: the vector's, vLLM's outputs.data.shape, which its bytes
    encoding reports."""

    request_id: str
    prompt_index: int
    data: bytes
    prompt_tokens: int
    finished: bool = False
    shape: tuple[int, ...] = ()
    # A score's input: whether the model's tokenizer has a pad token, with
    # which vLLM's bi-encoder scoring joins a pair's prompts.
    pad_token: bool = False


class FinishedStats(msgspec.Struct, frozen=True):
    """vLLM's FinishedRequestStats of one finished engine request (one
    completion): the phases only its engine sees."""

    queued_s: float
    prefill_s: float
    inference_s: float
    decode_s: float
    preemptions: int
    max_tokens: int | None
    prompt_tokens: int
    cached_tokens: int


class EngineStats(msgspec.Struct, frozen=True):
    """What vLLM's stat loggers were given for one model's engine steps
    (SchedulerStats, IterationStats), for its vllm:* series in the daemon.
    `iteration_tokens`: one entry per step that had outputs."""

    model: str
    iteration_tokens: list[int] = []
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    cached_prompt_tokens: int = 0
    finished: list[FinishedStats] = []


class Outputs(msgspec.Struct, tag="outputs", frozen=True):
    """Everything one engine step produced: one message per step, not per
    request, so concurrent streams cost one write and one wake-up. Its
    `stats` come first: a client that got its last token and then reads
    /metrics finds its request counted."""

    items: list[Output | Embedding]
    stats: list[EngineStats] = []


class RequestFailed(msgspec.Struct, tag="request_failed", frozen=True):
    request_id: str
    error: ErrorInfo


class Tokenized(msgspec.Struct, tag="tokenized", frozen=True):
    op_id: int
    token_ids: list[int]
    max_model_len: int
    token_strs: list[str] | None = None


class Detokenized(msgspec.Struct, tag="detokenized", frozen=True):
    op_id: int
    text: str


class Similarities(msgspec.Struct, tag="similarities", frozen=True):
    op_id: int
    scores: list[float]  # one per pair, in order


class Stats(msgspec.Struct, tag="stats", frozen=True):
    op_id: int
    pid: int
    rss_bytes: int
    models: list[str]
    running_requests: int
    device_allocated_bytes: int


Event = Union[Ready, Pong, Phase, OpDone, OpFailed, Outputs, RequestFailed, Tokenized,
              Detokenized, Similarities, Stats]

# ---- the forkserver: the daemon asks it for a worker ----------------------------


class ForkWorker(msgspec.Struct, tag="fork_worker", frozen=True):
    """The daemon's first frame to a forkserver (wcd/workers/forkserver.py),
    sent with two file descriptors: the worker's end of its socketpair and the
    stderr it logs to. `python`, `env`: the interpreter and environment the
    daemon would exec the worker with; the forkserver refuses when its own
    differ. `stop_timeout_s`: how long a worker whose daemon went has after
    SIGTERM before SIGKILL."""

    python: str
    env: dict[str, str]
    stop_timeout_s: float
    protocol_version: int = PROTOCOL_VERSION


class SignalWorker(msgspec.Struct, tag="signal_worker", frozen=True):
    """Send the forked worker this signal (its parent, the forkserver, knows
    whether the pid is still the worker's)."""

    signum: int


class WorkerForked(msgspec.Struct, tag="worker_forked", frozen=True):
    pid: int


class ForkRefused(msgspec.Struct, tag="fork_refused", frozen=True):
    """No fork: the daemon execs the worker itself, `reason` logged."""

    reason: str


class WorkerExited(msgspec.Struct, tag="worker_exited", frozen=True):
    """The forked worker's exit status, as asyncio's returncode (-N: signal N)."""

    code: int


ForkserverRequest = Union[ForkWorker, SignalWorker]
ForkserverReply = Union[WorkerForked, ForkRefused, WorkerExited]

SWAP_PHASES = ("resolve", "drain", "release", "fetch", "build", "warm", "ready")


# ---- framing --------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_event_decoder = msgspec.msgpack.Decoder(Event)
_forkserver_request_decoder = msgspec.msgpack.Decoder(ForkserverRequest)
_forkserver_reply_decoder = msgspec.msgpack.Decoder(ForkserverReply)


class ProtocolError(Exception):
    """A frame that cannot be decoded: the peer is broken or not ours."""


class VersionMismatch(ProtocolError):
    """The peer speaks another protocol version: its wcd is not this one's
    (the installed wcd changed under a running daemon, say)."""


class _Versioned(msgspec.Struct):
    """What every version's first frame carries, whatever else it holds."""

    protocol_version: int


_versioned_decoder = msgspec.msgpack.Decoder(_Versioned)
_setup_decoder = msgspec.msgpack.Decoder(Setup)


class FrameTooLarge(ValueError):
    """A message over MAX_FRAME_BYTES: refused before sending, since the peer
    would take the frame for a broken connection."""


def encode(message: Setup | Command | Event | ForkserverRequest | ForkserverReply) -> bytes:
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"a {type(message).__name__} of {len(body)} bytes exceeds the "
                            f"{MAX_FRAME_BYTES}-byte frame limit")
    return _HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


HEADER_SIZE = _HEADER.size


def recv_frame(sock) -> bytes | None:
    """One frame's body from a blocking socket (a worker's, a forkserver's);
    None at the peer's end of the connection."""
    header = _recv_exactly(sock, HEADER_SIZE)
    return None if header is None else _recv_exactly(sock, frame_length(header))


def _recv_exactly(sock, n: int) -> bytes | None:
    chunks, remaining = [], n
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_frame(reader) -> bytes:
    """One frame's body from an asyncio.StreamReader (the daemon's side)."""
    header = await reader.readexactly(HEADER_SIZE)
    return await reader.readexactly(frame_length(header))


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes):
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc)) from exc


def decode_command(body: bytes) -> Command:
    return _decode(_command_decoder, body)


def decode_event(body: bytes) -> Event:
    return _decode(_event_decoder, body)


def decode_forkserver_request(body: bytes) -> ForkserverRequest:
    return _decode(_forkserver_request_decoder, body)


def decode_forkserver_reply(body: bytes) -> ForkserverReply:
    return _decode(_forkserver_reply_decoder, body)


def check_version(body: bytes, peer: str) -> None:
    """Refuse a first frame of another protocol version, read before the rest
    of the frame, whose structs may differ."""
    try:
        version = _versioned_decoder.decode(body).protocol_version
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"{peer}'s first frame carries no protocol version: {exc}") from exc
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(f"{peer} speaks wcd protocol version {version}, not this "
                              f"side's {PROTOCOL_VERSION}: the two run different wcd installs")


def decode_setup(body: bytes) -> Setup:
    check_version(body, "the daemon")
    return _decode(_setup_decoder, body)
