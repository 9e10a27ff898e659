"""The LitServe peer for bench/peers.py: what a user would write instead of fewshot, with the same model.

    python bench/litserve_server.py --port 8002 [--workers 1] [--onnx PATH]

The same ONNX graph of EfficientNet-Lite0 that fewshot exports (uint8 pixels in, 1280-d features out),
run by ONNX Runtime in LitServe's inference workers with LitServe's own dynamic batching
(``max_batch_size=32``, ``batch_timeout=0.002``). Its ``decode_request`` does what LitServe's docs show
for images: PIL opens the upload, converts to RGB, resizes the short side to 256 (bicubic) and
centre-crops 224; never fewshot's image code, so fewshot's speed-ups do not speed it up. Enrolled
classes are prototypes in memory; ``/predict`` answers the nearest one.
"""
from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

import litserve as ls

SHORT_SIDE, CROP = 256, 224


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = SHORT_SIDE / min(w, h)
    image = image.resize((max(CROP, round(w * scale)), max(CROP, round(h * scale))), Image.BICUBIC)
    left, top = (image.width - CROP) // 2, (image.height - CROP) // 2
    return np.asarray(image.crop((left, top, left + CROP, top + CROP))).transpose(2, 0, 1)


class Recognizer(ls.LitAPI):
    def __init__(self, onnx_path: str, gallery: str | None) -> None:
        super().__init__(max_batch_size=32, batch_timeout=0.002)
        self.onnx_path, self.gallery = onnx_path, gallery

    def setup(self, device) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(self.onnx_path, providers=["CPUExecutionProvider"])
        self.prototypes, self.names = np.zeros((0, 1280), np.float32), []
        if self.gallery:  # the enrolled classes, loaded at start as such a deployment would
            stored = np.load(self.gallery)
            self.prototypes, self.names = stored["prototypes"], [str(n) for n in stored["names"]]

    def decode_request(self, request):
        upload = request["files"]
        return upload.file.read() if hasattr(upload, "file") else upload

    def batch(self, inputs):
        return inputs

    def predict(self, images):
        x = np.stack([pixels(data) for data in images])
        features = self.session.run(None, {"pixels": x})[0]
        features /= np.linalg.norm(features, axis=1, keepdims=True)
        if not self.names:
            return [{"label": None, "score": None} for _ in images]
        scores = features @ self.prototypes.T
        return [{"label": self.names[int(s.argmax())], "score": float(s.max())} for s in scores]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return {"results": [{"matches": [output]}]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=1, help="inference workers (processes)")
    parser.add_argument("--onnx", required=True, help="fewshot's exported efficientnet_lite0 graph")
    parser.add_argument("--gallery", default=None, help=".npz with prototypes (C, 1280) and names")
    args = parser.parse_args()
    server = ls.LitServer(Recognizer(args.onnx, args.gallery), accelerator="cpu", workers_per_device=args.workers,
                          timeout=60)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
