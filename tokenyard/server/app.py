"""The FastAPI application: routes, middleware, error handlers and the engine's lifespan."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenyard import __version__
from tokenyard.engine.async_engine import StreamingEngine
from tokenyard.server.errors import APIError, install_error_handlers
from tokenyard.server.metrics import ServerMetrics
from tokenyard.server.middleware import OPEN_PATHS, PUBLIC_PATHS, APIKeyMiddleware, BodySizeLimitMiddleware
from tokenyard.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    PriorityUpdate,
    TokenizeRequest,
)
from tokenyard.server.serving import OpenAIServing

log = logging.getLogger(__name__)


_ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0     # seconds in-flight requests get to finish on shutdown
    metrics_max_tenants: int = 20      # tenants with their own /metrics label; the rest are summed as "other"
    public_metrics: bool = False       # /metrics and the OpenAPI pages without the key, even with --api-key
    share_prefix_cache_across_tenants: bool = False   # else a named tenant's prompts are salted by its name
    client_priority_range: str = "0:1000"              # priorities a client may ask for; "any" trusts them all

    def __post_init__(self) -> None:
        if self.metrics_max_tenants < 0:
            raise ValueError(f"--metrics-max-tenants must be >= 0, got {self.metrics_max_tenants}")
        _ = self.priority_bounds  # validates

    @property
    def priority_bounds(self) -> tuple[int, int] | None:
        """(lo, hi) inclusive, or None for "any"."""
        text = self.client_priority_range.strip()
        if text == "any":
            return None
        lo, sep, hi = text.partition(":")
        try:
            bounds = (int(lo), int(hi))
        except ValueError:
            bounds = None
        if not sep or bounds is None or bounds[0] > bounds[1]:
            raise ValueError(f"--client-priority-range must be LO:HI (LO <= HI) or 'any', got {text!r}")
        return bounds


def create_app(engine: StreamingEngine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        log.info("shutting down: waiting up to %.0f s for %d in-flight requests",
                 settings.shutdown_timeout, engine.num_inflight)
        await engine.shutdown(settings.shutdown_timeout)

    app = FastAPI(title="tokenyard", version=__version__, lifespan=lifespan)
    metrics = ServerMetrics(engine.stats, engine.tenant_stats, settings.metrics_max_tenants)
    serving = OpenAIServing(engine, metrics, priority_bounds=settings.priority_bounds,
                            salt_by_tenant=not settings.share_prefix_cache_across_tenants)
    created = int(time.time())
    install_error_handlers(app)
    # Starlette runs the middleware added last first: the key is checked before a body is even read.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key,
                           open_paths=PUBLIC_PATHS if settings.public_metrics else OPEN_PATHS)

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "tokenyard",
                "max_model_len": engine.max_model_len}

    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict = {"status": "ok" if engine.is_running else "unavailable"}
        instances = getattr(engine, "instances", None)
        if instances is not None:   # a cluster: each instance's state and load
            body["instances"] = instances()
        return JSONResponse(body, status_code=200 if engine.is_running else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition"}})
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        """vLLM's: the token ids of a prompt, or of chat messages as the chat template renders them."""
        serving.check_model(body.model)
        if body.messages is not None:
            messages = [m.as_template_input() for m in body.messages]
            ids = await asyncio.to_thread(engine.tokenizer.apply_chat_template, messages)
        else:
            ids = await asyncio.to_thread(engine.tokenizer.encode, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        serving.check_model(body.model)
        vocab = engine.tokenizer.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens, False)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        serving.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/requests/{request_id}/priority")
    async def set_priority(request_id: str, body: PriorityUpdate) -> dict:
        """Change the priority of a request in flight (the id of its response or stream); from the next step."""
        return await serving.set_priority(request_id, body.priority)

    def openapi() -> dict:
        """FastAPI's document, made true to what the server answers: bad input is a 400 in OpenAI's error shape
        (never FastAPI's 422), and every route may answer an error in that shape."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {})["OpenAIError"] = _ERROR_SCHEMA
            ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}}
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    for status, what in (("400", "Bad request (a parameter named in error.param)"),
                                         ("401", "Missing or wrong API key"), ("404", "Unknown model or request"),
                                         ("413", "Request body too large"), ("500", "Internal error"),
                                         ("503", "Overloaded, or shutting down")):
                        responses.setdefault(status, {"description": what, **ref})
            schema["components"]["schemas"].pop("HTTPValidationError", None)
            schema["components"]["schemas"].pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.state.engine = engine
    app.state.metrics = metrics
    return app
