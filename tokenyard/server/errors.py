"""Every failure leaves the server as OpenAI's ``{"error": {message, type, param, code}}`` with a fitting status."""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenyard.engine.async_engine import EngineUnavailableError, QueueFullError
from tokenyard.sampling_params import InvalidParameterError

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def from_exception(e: BaseException) -> APIError:
    """Map an engine-side exception onto the API error a client should see."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), "server_error", code="server_overloaded")
    if isinstance(e, EngineUnavailableError):
        return APIError(503, str(e), "server_error", code="engine_unavailable")
    if isinstance(e, InvalidParameterError):  # the caller's mistake, named where it was found
        return APIError(400, str(e), param=e.param)
    error_id = f"err-{uuid.uuid4().hex[:12]}"
    log.error("internal error %s", error_id, exc_info=e)
    return APIError(500, f"internal server error ({type(e).__name__}); the server log has it as {error_id}",
                    "server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request. The body must be valid JSON "
                             f"({first.get('ctx', {}).get('error', 'invalid JSON')}).")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type name to the path (e.g. messages.0.content.str); keep the field path.
    loc = [p for p in loc if not any(c in p for c in "[]")
           and p not in {"str", "int", "float", "list", "constrained-str", "constrained-int"}]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        if param is None:
            return APIError(400, "The request body is missing: send a JSON object.")
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    msg = first.get("msg", "invalid value")
    if param is None:
        return APIError(400, f"Invalid request body: {msg}")
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"Invalid value for '{param}': {msg} (got {got}).", param=param)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = _validation_error(e)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return error_response(e.status_code, str(e.detail), kind, code=_STATUS_CODES.get(e.status_code),
                              headers=getattr(e, "headers", None))   # e.g. a 405's Allow

    async def _mapped(_: Request, e: Exception) -> JSONResponse:
        err = from_exception(e)
        return JSONResponse(err.body(), status_code=err.status)

    # Expected failures get their own handlers (a handler for Exception alone would still log a traceback).
    for exc in (InvalidParameterError, QueueFullError, EngineUnavailableError, Exception):
        app.add_exception_handler(exc, _mapped)
