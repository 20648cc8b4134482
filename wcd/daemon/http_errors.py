"""The one place where errors become HTTP responses, for both of the daemon's
aiohttp apps (control socket and OpenAI API)."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from wcd.daemon import errors

log = logging.getLogger(__name__)


def error_response(error: errors.WcdError) -> web.Response:
    headers = {}
    if isinstance(error, errors.Unavailable):
        headers["Retry-After"] = str(error.retry_after_s)
    return web.json_response(error.body(), status=error.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.WcdError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:  # aiohttp's client_max_size: http.max_body_bytes
            return error_response(errors.PayloadTooLarge(
                f"the request body is too large: {exc.text} (http.max_body_bytes)"))
        kind = errors.ModelNotFound if exc.status == 404 else errors.BadRequest
        error = kind(exc.reason)
        error.status = exc.status
        return error_response(error)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(errors.WcdError("internal error; see the daemon's log"))


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or a 400 that says what is wrong."""
    try:
        body = await request.read()
        data = json.loads(body)
    except web.HTTPRequestEntityTooLarge:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise errors.BadRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise errors.BadRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise errors.BadRequest("the body must be a JSON object")
    return data
