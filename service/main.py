"""The app factory: ``create_app(settings=None, encoder=None)``.

The lifespan puts the encoder, the galleries, the micro-batcher and the embedding pipeline on
``app.state``; routers do the rest. ``uvicorn --factory service.main:create_app`` or ``fewshot serve``
start it.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request

from fewshot.batching import MicroBatcher
from fewshot.encoders import Encoder, create_encoder
from fewshot.gallery import GalleryStore

from . import errors
from .config import Settings
from .deps import Embedder
from .limits import BodyLimit
from .metrics import Metrics
from .routes import adapt, classes, embed, health, recognize

VECTOR_ROUTES = "/recognize/embedding"


def create_app(settings: Settings | None = None, encoder: Encoder | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.encoder = encoder or await asyncio.to_thread(
            create_encoder, settings.encoder, settings.device, settings.runtime, settings.cache_dir,
            max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
            calibration=settings.calibration)
        state.recognizers = {}
        state.store = GalleryStore(settings.data_dir, settings.max_open_galleries,
                                   on_close=lambda name: state.recognizers.pop(name, None))
        state.adapt_jobs = {}
        state.background = set()
        state.calibrator = ThreadPoolExecutor(1, thread_name_prefix="calibrate")  # one at a time, all galleries
        state.decoders = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        state.batcher = MicroBatcher(state.encoder.embed, settings.max_batch_size, settings.max_wait_ms,
                                     settings.max_queue, on_batch=state.metrics.batch)
        state.embedder = Embedder(state.encoder, state.decoders, state.batcher)
        await state.batcher.start()
        await asyncio.to_thread(state.encoder.embed, np.zeros((1, *state.encoder.input_shape), np.uint8))  # warm
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            for task in list(state.background):
                task.cancel()
            await state.batcher.stop()
            state.decoders.shutdown(wait=True)
            state.calibrator.shutdown(wait=True, cancel_futures=True)
            state.store.close()

    app = FastAPI(title="fewshot", version="0.1.0", lifespan=lifespan,
                  description="Enroll classes from one or a few images; recognise, verify, embed.")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes,
                       tighter={VECTOR_ROUTES: settings.max_vector_request_bytes})

    @app.middleware("http")
    async def time_requests(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        app.state.metrics.request(getattr(route, "path", "unmatched"), time.perf_counter() - started)
        return response

    for router in (health.router, embed.router, classes.router, recognize.router, adapt.router):
        app.include_router(router)
    return app
