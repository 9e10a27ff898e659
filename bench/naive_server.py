"""The naive baseline server for bench/serve.py: one PyTorch forward per request, no batching.

    python bench/naive_server.py --port 8001

Same encoder weights and preprocessing as fewshot, PyTorch eager fp32, a plain synchronous route
(FastAPI runs it in its thread pool), prototypes held in memory.
"""
from __future__ import annotations

import argparse

import numpy as np
import uvicorn
from fastapi import FastAPI, UploadFile

from fewshot import create_encoder


def build(cache_dir: str | None) -> FastAPI:
    encoder = create_encoder("efficientnet_lite0", device="cpu", runtime="torch", cache_dir=cache_dir)
    app = FastAPI()
    classes: dict[str, list[np.ndarray]] = {}

    @app.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201)
    def enroll(gallery: str, label: str, files: UploadFile) -> dict:
        classes.setdefault(label, []).append(encoder.embed(encoder.preprocess(files.file.read())[None])[0])
        return {"label": label}

    @app.post("/v1/galleries/{gallery}/recognize")
    def recognize(gallery: str, files: UploadFile) -> dict:
        row = encoder.embed(encoder.preprocess(files.file.read())[None])[0]
        names = sorted(classes)
        protos = np.stack([np.mean(classes[n], axis=0) for n in names])
        scores = protos @ row / np.linalg.norm(protos, axis=1)
        return {"results": [{"matches": [{"label": names[int(scores.argmax())], "score": float(scores.max())}]}]}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    uvicorn.run(build(args.cache_dir), host="127.0.0.1", port=args.port, log_level="warning")
