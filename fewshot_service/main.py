"""The app factory: ``create_app(settings=None, encoder=None)``.

The lifespan puts the encoder pool (the default encoder loaded and warm; others on first use, each
with its own micro-batcher) and the galleries on ``app.state``; routers do the rest.
``uvicorn --factory fewshot_service.main:create_app`` or ``fewshot serve`` start it. Tests inject encoders:
``encoder`` (the default) or ``encoders`` (by name, the first the default).
"""
from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from fewshot.encoders import Encoder
from fewshot.gallery_store import GalleryStore

from . import docs, errors
from .config import Settings
from .deps import Recognizers
from .encoders import EncoderPool
from .admission import Admission, Uploads
from .balance import Balance
from .limits import BodyLimit
from .paths import EncodedSlashes
from .metrics import Metrics
from .routes import adapt, classes, embed, faces, health, recognize, reembed

VECTOR_ROUTES = "/recognize/embedding"
OPEN_PATHS = ("/healthz", "/readyz")  # never behind a key
WORKER = str(os.getpid())
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
                               "script-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
STATIC = Path(__file__).resolve().parent / "static"  # the page: plain files, no build step


def _openapi(app: FastAPI, settings: Settings, given: dict | None) -> dict:
    """FastAPI's schema, with the encoders this server offers as the enum of every encoder field."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        offered = EncoderPool.offered(settings, given)
        for model in ("GalleryIn", "ReembedIn"):
            field = schema["components"]["schemas"][model]["properties"]["encoder"]
            optional = "anyOf" in field  # null: the default encoder
            field.pop("anyOf", None)
            field.update({"anyOf": [{"type": "string", "enum": offered}, {"type": "null"}]} if optional
                         else {"type": "string", "enum": offered})
        for parameter in schema["paths"]["/v1/embed"]["post"]["parameters"]:
            if parameter["name"] == "encoder":
                parameter["schema"] = {"type": "string", "enum": offered}
        schema["components"]["securitySchemes"] = {  # what fewshot_service/auth.py reads; Swagger UI can then send it
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "bearer": {"type": "http", "scheme": "bearer", "description": "the same key as a bearer token"}}
        for path, operations in schema["paths"].items():  # needed only when the server has keys: {} = none
            if path not in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = [{"apiKey": []}, {"bearer": []}, {}]
        app.openapi_schema = schema
    return app.openapi_schema


def _open_galleries(store: GalleryStore) -> float:
    """Build the index of every gallery (up to the open limit) before saying ready, so no first query
    waits on a build; returns the seconds it took."""
    started, names = time.perf_counter(), store.names()
    for name in names[:store.max_open] if store.max_open else names:
        store.get(name)
    return round(time.perf_counter() - started, 3)


def create_app(settings: Settings | None = None, encoder: Encoder | None = None,
               encoders: dict[str, Encoder] | None = None) -> FastAPI:
    settings = settings or Settings()
    given = encoders or ({encoder.name: encoder} if encoder is not None else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.calibrator = ThreadPoolExecutor(1, thread_name_prefix="calibrate")  # one at a time, all galleries
        state.recognizers = Recognizers(state.calibrator, settings.default_far)
        state.store = await asyncio.to_thread(  # PostgreSQL: connects (waiting for it a while) and migrates
            GalleryStore, settings.database_url or settings.data_dir, settings.max_open_galleries,
            on_close=state.recognizers.forget)
        state.adapt_jobs, state.reembed_jobs = {}, {}
        state.background = set()
        state.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        state.encoders = EncoderPool(settings, state.decoders, state.metrics, given)
        await state.encoders.get()  # the default encoder, loaded and warm before /readyz says ready
        state.build_seconds = await asyncio.to_thread(_open_galleries, state.store)  # indexes before ready
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            for task in list(state.background):
                task.cancel()
            await state.encoders.stop()
            state.decoders.shutdown(wait=True)
            state.calibrator.shutdown(wait=True, cancel_futures=True)
            state.store.close()

    app = FastAPI(title="fewshot", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Enroll classes from one or a few images; recognise, verify, embed.")
    docs.install(app)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes,
                       tighter={VECTOR_ROUTES: settings.max_vector_request_bytes})
    app.add_middleware(EncodedSlashes)
    app.state.admission = Admission(settings.max_uploads, settings.max_images_in_flight, settings.body_timeout_s,
                                    settings.max_bytes_in_flight, settings.max_request_bytes)
    app.add_middleware(Uploads, admission=app.state.admission)

    @app.middleware("http")
    async def page_headers(request: Request, call_next):
        """The page and its files may run only our own script, show only our images, and not be framed."""
        response = await call_next(request)
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers.update(PAGE_HEADERS)
        return response

    balance = Balance(settings.balance_table) if settings.balance_table and (settings.workers or 1) > 1 else None

    @app.middleware("http")
    async def time_requests(request: Request, call_next):
        started = time.perf_counter()
        if balance is not None:
            balance.begin()
        try:
            response = await call_next(request)
        finally:
            if balance is not None:
                balance.end()
        route = request.scope.get("route")
        app.state.metrics.request(getattr(route, "path", "unmatched"), time.perf_counter() - started)
        response.headers["X-Fewshot-Worker"] = WORKER  # which process answered (fewshot serve --workers N)
        if balance is not None and balance.overloaded():  # busier than another worker: the client reconnects
            response.headers["Connection"] = "close"
        return response

    for router in (health.router, embed.router, faces.router, classes.router, recognize.router, adapt.router,
                   reembed.router):
        app.include_router(router)
    app.openapi = lambda: _openapi(app, settings, given)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The page: galleries, classes with their images, enroll and recognise in the browser."""
        return FileResponse(STATIC / "index.html")

    return app
