"""The HTTP API and the page, on FastAPI.

Why FastAPI (on Starlette) served by uvicorn: a standard, well-maintained ASGI stack whose
OpenAPI schema comes from the same typed declarations that validate requests, with an event
loop that holds many slow uploads at little cost while the models run in worker threads; uvicorn
is its reference server. Two of Starlette's conveniences are bypassed on purpose: uploads are
read by :mod:`shpeft.serve.upload` (Starlette spools large files to disk), and every error,
including Starlette's own 404/405 and FastAPI's validation errors, is ``{"detail": "<one
sentence>"}`` with a 4xx status (5xx only for the server's own faults).

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /tasks``, ``POST /predict/{task}``,
``POST /predict`` (every task), ``GET /openapi.json`` and ``/docs``. With an API key, every
request must carry it (``X-API-Key: KEY``, ``Authorization: Bearer KEY``, or HTTP Basic with KEY
as the password, which lets a browser open the page). Without one, only loopback Host headers are
accepted, so a web page cannot reach a loopback server through DNS rebinding.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from shpeft._version import __version__
from shpeft.serve.decode import RequestError, decode_upload, to_input
from shpeft.serve.engine import Engine, EngineClosed
from shpeft.serve.page import PAGE
from shpeft.serve.registry import Registry, Task
from shpeft.serve.render import heatmap_data_url
from shpeft.serve.upload import read_file_field

log = logging.getLogger("shpeft.serve")

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass
class ServeSettings:
    """Limits and access control of the HTTP layer."""

    max_upload_bytes: int = 32 * 2**20
    max_pixels: int = 40_000_000
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    """Host header names accepted (None: any); the default suits a loopback bind without key."""
    decode_threads: int = 2
    max_batch: int = 32
    batch_wait_ms: float = 0.0
    heatmap: str = "grad-rollout"

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_pixels", "decode_threads", "max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError("the API key must be at least 16 characters long")


# --------------------------------------------------------------------------------------------
# response bodies (they are the OpenAPI schema)


class ErrorBody(BaseModel):
    detail: str = Field(description="what was wrong with the request, in one sentence")


class Prediction(BaseModel):
    task: str
    method: str
    classes: list[str] = Field(description="the run's classes, in its order")
    probabilities: list[float] = Field(description="softmax probabilities, in class order")
    prediction: str = Field(description="the most probable class")
    logits: list[float]
    heatmap: str | None = Field(
        None, description="PNG data URL: relevance for the predicted class (with ?heatmap=true)"
    )


class Predictions(BaseModel):
    predictions: list[Prediction] = Field(description="one per served task, in --runs order")


class TaskInfo(BaseModel):
    name: str
    classes: list[str]
    method: str
    served_as: str = Field(
        description="switch delta (written into the shared backbone per batch), own modules "
        "(adapters, prompts, LoRA/SSF factors over the shared weights), both, or head only"
    )
    mergeable: bool
    trainable_pct: float | None = Field(description="trained share of the backbone, in %")
    delta_bytes: int
    test: dict[str, Any] | None = Field(description="the run's test metrics (metrics.json)")
    base: str = Field(description="SHA-256 of the backbone the task runs on")
    base_model: str
    input_size: int
    memory_bytes: dict[str, int] = Field(
        description="own: tensors of the task alone (head, modules); switch: its switch delta"
    )


class RefusedRun(BaseModel):
    name: str
    run_dir: str
    reason: str


class TaskList(BaseModel):
    tasks: list[TaskInfo]
    refused: list[RefusedRun]


class Health(BaseModel):
    status: str
    version: str
    tasks: int
    refused: int
    shared: bool = Field(description="false for the comparison mode with one model per task")
    bases: list[dict[str, Any]]
    memory_bytes: dict[str, int]


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, TIFF, BMP or DICOM",
                        }
                    },
                }
            }
        },
    }
}
_ERRORS = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed multipart body",
        401: "missing or wrong API key",
        404: "unknown or refused task",
        413: "upload or image over the limits",
        415: "not multipart, or not an image",
        422: "no file field, or an image that cannot be decoded",
        503: "shutting down",
    }.items()
}


# --------------------------------------------------------------------------------------------
# the app


def create_app(registry: Registry, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``registry`` (starts its engine's workers)."""
    settings = settings or ServeSettings()
    engine = Engine(
        registry,
        max_batch=settings.max_batch,
        batch_wait_s=settings.batch_wait_ms / 1000,
        explain_method=settings.heatmap,
    )
    pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="shpeft-decode")

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        engine.close()
        pool.shutdown(wait=True)

    app = FastAPI(
        title="shpeft serve",
        version=__version__,
        description="Diagnostic tasks as SH-PEFT deltas on shared ViT backbones.",
        lifespan=lifespan,
    )
    app.state.registry, app.state.engine, app.state.settings = registry, engine, settings
    app.add_middleware(_Guard, api_key=settings.api_key, allowed_hosts=settings.allowed_hosts)
    _add_error_handlers(app)

    async def in_pool(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def task_or_404(name: str) -> Task:
        if name in registry.tasks:
            return registry.tasks[name]
        if name in registry.refused:
            raise RequestError(
                404, f"task {name!r} was refused at start-up: {registry.refused[name].reason}"
            )
        served = ", ".join(registry.tasks)
        raise RequestError(404, f"unknown task {name!r}; this server serves {served}")

    async def read_image(request: Request):
        upload = await read_file_field(
            request.headers.get("content-type", ""),
            request.headers.get("content-length"),
            request.stream(),
            max_bytes=settings.max_upload_bytes,
        )
        return await in_pool(
            lambda: decode_upload(upload.data, upload.filename, max_pixels=settings.max_pixels)
        )

    async def run(future_of: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(future_of())
        except EngineClosed as e:  # shutting down, or a base that could not be restored
            raise RequestError(503, str(e)) from e

    async def predictions(
        tasks: list[Task], inputs: dict[Any, torch.Tensor], heatmap: bool
    ) -> list[Prediction]:
        # Queue every task's job before awaiting any, so that a base's worker sees them together.
        logits = await asyncio.gather(
            *(run(lambda t=t: engine.predict(t, inputs[t.spec])) for t in tasks)
        )
        out = []
        for t, z in zip(tasks, logits, strict=True):
            probs = z.softmax(-1)
            out.append(
                Prediction(
                    task=t.name,
                    method=t.method,
                    classes=t.classes,
                    probabilities=probs.tolist(),
                    prediction=t.classes[int(probs.argmax())],
                    logits=z.tolist(),
                )
            )
        if heatmap:
            maps = await asyncio.gather(
                *(
                    run(
                        lambda t=t, p=p: engine.explain(
                            t, inputs[t.spec], t.classes.index(p.prediction)
                        )
                    )
                    for t, p in zip(tasks, out, strict=True)
                )
            )
            urls = await asyncio.gather(
                *(
                    in_pool(heatmap_data_url, inputs[t.spec], m, t.spec)
                    for t, m in zip(tasks, maps, strict=True)
                )
            )
            for p, url in zip(out, urls, strict=True):
                p.heatmap = url
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=_PAGE_HEADERS)

    @app.get("/health", response_model=Health, responses=_ERRORS, summary="server status")
    async def health() -> Health:
        return Health(
            status="ok",
            version=__version__,
            tasks=len(registry.tasks),
            refused=len(registry.refused),
            shared=registry.shared,
            bases=engine.stats(),
            memory_bytes=registry.memory(),
        )

    @app.get("/tasks", response_model=TaskList, responses=_ERRORS, summary="the served tasks")
    async def list_tasks() -> TaskList:
        return TaskList(
            tasks=[TaskInfo(**t.describe()) for t in registry.tasks.values()],
            refused=[
                RefusedRun(name=r.name, run_dir=str(r.run_dir), reason=r.reason)
                for r in registry.refused.values()
            ],
        )

    @app.post(
        "/predict/{task}",
        response_model=Prediction,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
        summary="classify an image with one task",
    )
    async def predict_task(task: str, request: Request, heatmap: bool = False) -> Prediction:
        t = task_or_404(task)
        image = await read_image(request)
        x = await in_pool(to_input, image, t.spec)
        return (await predictions([t], {t.spec: x}, heatmap))[0]

    @app.post(
        "/predict",
        response_model=Predictions,
        response_model_exclude_none=True,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_BODY,
        summary="classify an image with every task",
    )
    async def predict_all(request: Request, heatmap: bool = False) -> Predictions:
        image = await read_image(request)
        tasks = list(registry.tasks.values())
        specs = list(dict.fromkeys(t.spec for t in tasks))  # decode once, prepare once per spec
        xs = await asyncio.gather(*(in_pool(to_input, image, s) for s in specs))
        return Predictions(
            predictions=await predictions(tasks, dict(zip(specs, xs, strict=True)), heatmap)
        )

    return app


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _add_error_handlers(app: FastAPI) -> None:
    """Every error is ``{"detail": "<one sentence>"}``."""

    def body(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(_request: Request, e: RequestError) -> JSONResponse:
        return body(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if e.status_code == 404:
            return body(404, f"there is no {path} on this server (see /docs)")
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow", "")
            return body(
                405,
                f"{request.method} is not allowed on {path}; use {allow or 'another method'}",
                headers=e.headers,
            )
        return body(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        where = f"the {loc[0]} parameter {loc[-1]!r}" if len(loc) > 1 else "the request"
        msg = str(first.get("msg", "invalid value"))
        return body(422, f"{where} is invalid: {msg[:1].lower()}{msg[1:]}")

    @app.exception_handler(Exception)
    async def server_error(_request: Request, e: Exception) -> JSONResponse:
        log.error("request failed", exc_info=e)
        return body(500, "the server failed on this request; the error is in its log")


# --------------------------------------------------------------------------------------------
# access control


_HOST = re.compile(r"(\[[^\]]*\]|[^:]*)(:\d+)?")


class _Guard:
    """ASGI middleware: the API key on every request, and the Host check (DNS rebinding)."""

    def __init__(self, app, api_key: str | None, allowed_hosts: tuple[str, ...] | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.hosts is not None:
            m = _HOST.fullmatch(headers.get("host", "").lower())
            if m is None or m.group(1) not in self.hosts:
                detail = "this server only answers requests addressed to it by a loopback name"
                return await JSONResponse({"detail": detail}, 421)(scope, receive, send)
        if self.key is not None and not _has_key(headers, self.key):
            detail = "this server needs its API key (X-API-Key or Authorization header)"
            response = JSONResponse(
                {"detail": detail}, 401, headers={"WWW-Authenticate": 'Basic realm="shpeft"'}
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _has_key(headers: Headers, key: bytes) -> bool:
    given = headers.get("x-api-key", "").encode()
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip().encode()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return False
    return bool(given) and hmac.compare_digest(given, key)
