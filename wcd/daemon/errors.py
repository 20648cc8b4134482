"""Typed errors inside the daemon, mapped once to HTTP at the edge.

Every error the control API or the OpenAI API returns is one of these, as
OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import re
from typing import Any

from wcd.daemon.vllm_dialect import VLLM_032, Dialect
from wcd.workers import protocol as p


class WcdError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code or self.type}}


class BadRequest(WcdError):
    status = 400
    type = "invalid_request_error"


class VllmBadRequest(BadRequest):
    """A refusal the OpenAI API words as vLLM's api_server does, with its type;
    the code stays the one OpenAI clients know."""

    type = "BadRequestError"
    code = "invalid_request_error"


class VllmValidationError(VllmBadRequest):
    """vLLM's VLLMValidationError as its server words it: the reason, then its
    parameter and value."""

    def __init__(self, reason: str, param: str | None = None, value: Any = None):
        extras = [f"{key}={given}" for key, given in (("parameter", param), ("value", value))
                  if given is not None]
        super().__init__(f"{reason} ({', '.join(extras)})" if extras else reason, param=param)
        self.reason = reason


class ValidatorRefusal(VllmValidationError):
    """One that vLLM raises in its request model's validators: of the whole
    body, else (`field`) of that field's value. `bare`: vLLM 0.26 raised it
    as a plain ValueError, which names no parameter. `members`: raised by
    some members of a union of request models (vLLM's embedding and pooling
    requests), each member in order the required field it missed instead,
    or None where it raised this; `member`: where pydantic locates a
    member's errors."""

    def __init__(self, reason: str, param: str | None = None, value: Any = None, *,
                 bare: bool = False, field: str | None = None,
                 members: tuple[str | None, ...] = (), member: str | None = None):
        super().__init__(reason, param, value)
        self.bare = bare
        self.field = field
        self.members = members
        self.member = member or UNION_MEMBER


def serving_refusal(reason: str, param: str, named: bool) -> VllmBadRequest:
    """A refusal of vLLM's serving code: a VLLMValidationError naming `param`
    where `named`, else a plain ValueError, which names none."""
    return VllmValidationError(reason, param) if named else VllmBadRequest(reason)


class RequestValidation(VllmBadRequest):
    """A refusal as vLLM's RequestValidationError handler words it, with its type."""

    type = "Bad Request"


class UnsupportedMediaType(RequestValidation):
    """vLLM's answer to a body that is not application/json: a 400, as its
    request validation's, not a 415."""

    def __init__(self) -> None:
        super().__init__("1 validation error:\n  Unsupported Media Type: Only "
                         "'application/json' is allowed")


class WrappedRefusal(RequestValidation):
    """A ValidatorRefusal as vLLM 0.26 answers it: pydantic wraps the ValueError
    as a value_error of the whole body, or of its field, whose `input` is what
    the validator had (the request's JSON as json decodes it, keys in order,
    or the field's value in it), and lists a union's members' errors each;
    the server's validation_exception_handler prints them and sanitizes the
    message."""

    def __init__(self, refusal: ValidatorRefusal, body: Any):
        raised = "ValueError" if refusal.bare else "VLLMValidationError"
        said = "Value error, " + (refusal.reason if refusal.bare else str(refusal))
        given = body if refusal.field is None else body[refusal.field]

        def value_error(loc: tuple[str, ...]) -> str:
            return (f"{{'type': 'value_error', 'loc': {loc!r}, 'msg': {said!r}, "
                    f"'input': {given!r}, 'ctx': {{'error': {raised}({refusal.reason!r})}}}}")

        if refusal.members:
            member = refusal.member
            locs = [("body", member) if missing is None else ("body", member, missing)
                    for missing in refusal.members]
            errors = [value_error(loc) if len(loc) == 2 else
                      f"{{'type': 'missing', 'loc': {loc!r}, 'msg': 'Field required', "
                      f"'input': {body!r}}}" for loc in locs]
        else:
            locs = [("body",) if refusal.field is None else ("body", refusal.field)]
            errors = [value_error(locs[0])]
        label = "error" if len(errors) == 1 else "errors"
        listed = "\n".join(f"  {error}" for error in errors)
        # Its param: the VLLMValidationError's, else the first error's
        # location, pydantic's markers left out.
        super().__init__(_sanitized(f"{len(errors)} validation {label}:\n{listed}"),
                         param=(None if refusal.bare else refusal.param)
                         or ".".join(part for part in locs[0] if part != refusal.member))


# Where pydantic locates the errors of a union's member: vLLM's request
# models' __log_extra_fields__, a wrap validator.
UNION_MEMBER = "function-wrap[__log_extra_fields__()]"


# vLLM 0.26's sanitize_message: no memory addresses, tracebacks or file paths.
_SANITIZERS = (
    (re.compile(r" at 0x[0-9a-f]+>"), ">"),
    (re.compile(r'\n?\s*File "[^"]+", line \d+, in \S+(\n\s+.*)?'), ""),
    (re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+"), "<path>"),
    (re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+"), "<path>"),
)


def _sanitized(message: str) -> str:
    for pattern, replacement in _SANITIZERS:
        message = pattern.sub(replacement, message)
    return message.strip()


class PayloadTooLarge(WcdError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class Unauthorized(WcdError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(WcdError):
    status = 403
    type = "permission_error"


class ModelNotFound(WcdError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class VllmModelNotFound(ModelNotFound):
    """An unknown model as vLLM's api_server words it, with its type."""

    type = "NotFoundError"

    def __init__(self, model: str, aliases: list[str] | None = None):
        # vLLM's tokenizer endpoints name the models that do exist.
        valid = "" if aliases is None else f" Valid aliases: {', '.join(aliases)}."
        super().__init__(f"The model `{model}` does not exist.{valid}", param="model")


class TaskUnsupported(WcdError):
    """A request for a task its model does not do (an embedding for a
    generating model, a completion for a pooling one): vLLM's server has no
    such route for that model, so a 404, with its handlers' words."""

    status = 404
    type = "NotFoundError"
    code = "not_found"


class ModelUnusable(WcdError):
    """The model is known but its files, config or engine args cannot be served."""

    status = 422
    type = "invalid_request_error"
    code = "model_unusable"


class Conflict(WcdError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Unavailable(WcdError):
    """Cannot be served in time: queue full, wait timed out, no worker, stopping."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsufficientMemory(WcdError):
    status = 507
    type = "insufficient_storage"
    code = "out_of_memory"


class WorkerFailed(WcdError):
    """The worker died under the request or operation."""

    status = 502
    type = "worker_error"


class InternalError(WcdError):
    """A failure that was neither the request's nor the model's: a worker's
    (logged there with its traceback), or the daemon's running an operation.
    A 500, with the type vLLM's server gives an exception it did not expect."""

    type = "InternalServerError"
    code = "internal_error"


def from_worker(error: p.ErrorInfo, dialect: Dialect = VLLM_032) -> WcdError:
    """The daemon-side error for a failure a worker reported as data; a
    refusal of vLLM's serving code names its parameter as `dialect` does."""
    if error.kind == p.BAD_ARGS and error.param is not None:
        return serving_refusal(error.message, error.param,
                               dialect.serving_refusals_name_parameter)
    kinds = {
        p.BAD_MODEL: ModelUnusable,
        p.BAD_ARGS: BadRequest,
        p.OUT_OF_MEMORY: InsufficientMemory,
        p.NOT_LOADED: Conflict,
        p.UNSUPPORTED: TaskUnsupported,
        p.ABORTED: Unavailable,
        p.BUSY: Conflict,
        p.GONE: WorkerFailed,
    }
    return kinds.get(error.kind, InternalError)(error.message)
