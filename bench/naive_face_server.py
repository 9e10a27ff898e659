"""The naive face baseline for bench/serve.py --faces: dlib itself, one call chain per request.

    python bench/naive_face_server.py --port 8002

What a user writes with dlib's own Python API: decode, HOG detector (upsampled once where the photo
is small, as fewshot does), 5 landmarks, ``compute_face_descriptor`` (dlib's network on the CPU),
nearest class prototype. A plain synchronous FastAPI route (run in its thread pool, one set of dlib objects per thread: dlib's
are not safe to share), no batching.
"""
from __future__ import annotations

import argparse
import io
import threading

import dlib
import numpy as np
import uvicorn
from fastapi import FastAPI, UploadFile
from PIL import Image

from fewshot.faces import LANDMARKS_FILE, NETWORK_FILE, model_file


def build() -> FastAPI:
    app = FastAPI()
    classes: dict[str, list[np.ndarray]] = {}
    local = threading.local()  # dlib's objects are not safe to share between threads: one set per thread

    def descriptors(data: bytes) -> list[np.ndarray]:
        if not hasattr(local, "network"):
            local.detector = dlib.get_frontal_face_detector()
            local.predictor = dlib.shape_predictor(str(model_file(LANDMARKS_FILE)))
            local.network = dlib.face_recognition_model_v1(str(model_file(NETWORK_FILE)))
        detector, predictor, network = local.detector, local.predictor, local.network
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        faces = detector(rgb, 0) or (detector(rgb, 1) if min(rgb.shape[:2]) < 400 else [])
        return [np.asarray(network.compute_face_descriptor(rgb, predictor(rgb, f))) for f in faces]

    @app.post("/v1/galleries/{gallery}/classes/{label}/examples", status_code=201)
    def enroll(gallery: str, label: str, files: UploadFile) -> dict:
        classes.setdefault(label, []).append(descriptors(files.file.read())[0])
        return {"label": label}

    @app.post("/v1/galleries/{gallery}/recognize")
    def recognize(gallery: str, files: UploadFile) -> dict:
        names = sorted(classes)
        protos = np.stack([np.mean(classes[n], axis=0) for n in names])
        results = []
        for row in descriptors(files.file.read()):
            distances = np.linalg.norm(protos - row, axis=1)
            results.append({"matches": [{"label": names[int(distances.argmin())], "distance": float(distances.min())}],
                            "unknown": bool(distances.min() > 0.6)})
        return {"results": results}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    uvicorn.run(build(), host="127.0.0.1", port=args.port, log_level="warning")
