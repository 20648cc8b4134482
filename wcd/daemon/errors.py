"""Typed errors inside the daemon, mapped once to HTTP at the edge.

Every error the control API or the OpenAI API returns is one of these, as
OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

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


class UnsupportedMediaType(VllmBadRequest):
    """vLLM's answer to a body that is not application/json: a 400, as its
    request validation's, not a 415."""

    type = "Bad Request"

    def __init__(self) -> None:
        super().__init__("1 validation error:\n  Unsupported Media Type: Only "
                         "'application/json' is allowed")


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
    status = 502
    type = "worker_error"


def from_worker(error: p.ErrorInfo) -> WcdError:
    """The daemon-side error for a failure a worker reported as data."""
    kinds = {
        p.BAD_MODEL: ModelUnusable,
        p.BAD_ARGS: BadRequest,
        p.OUT_OF_MEMORY: InsufficientMemory,
        p.NOT_LOADED: Conflict,
        p.UNSUPPORTED: TaskUnsupported,
        p.ABORTED: Unavailable,
        p.BUSY: Conflict,
    }
    return kinds.get(error.kind, WorkerFailed)(error.message)
