"""The opt-in int8 runtime against fp32 ONNX Runtime: speed, and what it costs in accuracy.

    python bench/int8.py [--data ../shared/data] [--work /tmp/fewshot-int8] [--seconds 8]

Speed: both runtimes on the same batch of 640x480 photo crops, interleaved rounds, medians.
Agreement: cosine between int8 and fp32 embeddings of photos the calibration never saw; few-shot
accuracy on real data with each runtime calibrated on *other classes* of the same domain (faces:
calibrated on people s1-s20, tested on s21-s40; Omniglot: calibrated on background characters,
tested on the evaluation alphabets).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import photo_jpegs, rate  # noqa: E402

from fewshot.datasets import Reader, export_omniglot, list_items  # noqa: E402
from fewshot.encoders import create_encoder  # noqa: E402
from fewshot.evaluate import run_episodes  # noqa: E402


def speed(encoder, batch: np.ndarray, seconds: float) -> float:
    return rate(lambda: len(encoder.embed(batch)), seconds)


def embed_items(encoder, items) -> np.ndarray:
    reader = Reader()
    return encoder.embed_images((reader.read(item.path) for item in items), batch_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewshot-int8"))
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args()
    cache = args.work / "cache"
    fp32 = create_encoder(runtime="onnx", cache_dir=cache)
    photos = [data for _, data in photo_jpegs(128, seed=3)]
    int8 = create_encoder(runtime="onnx-int8", cache_dir=cache, calibration=photos)
    batch = np.stack([fp32.preprocess(data) for _, data in photo_jpegs(16, seed=5)])
    rounds = [(speed(fp32, batch, args.seconds), speed(int8, batch, args.seconds)) for _ in range(3)]
    a, b = np.median([r[0] for r in rounds]), np.median([r[1] for r in rounds])
    print(f"batch 16, 3 interleaved rounds: fp32 {a:.1f} img/s, int8 {b:.1f} img/s = {b / a:.2f}x")
    unseen = [data for _, data in photo_jpegs(64, seed=9)]
    cosine = (fp32.embed_images(unseen) * int8.embed_images(unseen)).sum(axis=1)
    print(f"cosine(int8, fp32) on 64 unseen photo crops: mean {cosine.mean():.4f}, min {cosine.min():.4f}")

    faces = list_items(args.data / "faces" / "att_faces.zip")
    person = np.array([int(item.label.lstrip("s")) for item in faces])
    face_int8 = create_encoder(runtime="onnx-int8", cache_dir=cache,
                               calibration=[Reader().read(item.path) for item, p in zip(faces, person) if p <= 20])
    test = [item for item, p in zip(faces, person) if p > 20]
    labels = [item.label for item in test]
    for name, encoder in [("fp32", fp32), ("int8", face_int8)]:
        r = run_episodes(embed_items(encoder, test), labels, 20, 1, 9, args.episodes, seed=0)
        print(f"faces s21-s40 20-way 1-shot, {name}: {r.accuracy:.1f} ± {r.ci95:.1f}")

    if not (args.work / "omniglot-eval").exists():
        export_omniglot(args.data / "omniglot" / "images_evaluation.npz", args.work / "omniglot-eval")
        export_omniglot(args.data / "omniglot" / "images_background.npz", args.work / "omniglot-base", classes=128)
    base = list_items(args.work / "omniglot-base")
    glyph_int8 = create_encoder(runtime="onnx-int8", cache_dir=cache,
                                calibration=[Reader().read(item.path) for item in base[::10]])
    evaluation = list_items(args.work / "omniglot-eval")
    labels = [item.label for item in evaluation]
    for name, encoder in [("fp32", fp32), ("int8", glyph_int8)]:
        r = run_episodes(embed_items(encoder, evaluation), labels, 20, 1, 15, args.episodes, seed=0)
        print(f"omniglot evaluation 20-way 1-shot, {name}: {r.accuracy:.1f} ± {r.ci95:.1f}")


if __name__ == "__main__":
    main()
