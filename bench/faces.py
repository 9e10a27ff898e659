"""The face encoder on ORL (AT&T faces): accuracy, strangers, the reference operating point, speed.

    python bench/faces.py [--data ../shared/data] [--work /tmp/fewshot-faces] [--write-reference]

- embeds att_faces.zip with `fewshot embed --encoder face` (detect: HOG), `face:cnn` (dlib's CNN
  detector, ported) and `--encoder face:crop`;
- 40-way 1-shot and 20-way 5-shot episodes (the frozen EfficientNet-Lite0 gave 70.4% 40-way 1-shot);
- the reference operating point: impostor cosines between one photo each of two different people
  among s1-s20 only (the reference people), thresholds by false-accept rate; --write-reference
  stores them in fewshot/reference_data/face.json, which galleries too small to calibrate themselves use;
- the stranger test over 500 random trios of s21-s40 (never used for the reference): one photo each
  enrolled, another photo of each recognised, a fourth person's photo must come back `unknown` at
  the default threshold (the reference one at 1%);
- speed: our ONNX Runtime fp32 trunk at batch 16 against dlib's own compute_face_descriptor per face,
  and detection + landmarks + chip per 640x480 photo.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from fewshot import create_encoder
from fewshot.evaluate import run_episodes
from fewshot.faces import FaceLocator, NETWORK_FILE, model_file
from fewshot.reference import REFERENCE_DIR, far_thresholds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embedded, rate  # noqa: E402

REFERENCE_PEOPLE = {f"s{i}" for i in range(1, 21)}


def person(row: dict) -> str:
    return row["label"].split("/")[-1]


def stranger_test(x: np.ndarray, labels: np.ndarray, threshold: float, trials: int, seed: int = 0) -> tuple:
    """(share of draws with the stranger unknown, share with all three genuine photos right and
    accepted, share with both)."""
    rng = np.random.default_rng(seed)
    people = sorted(set(labels))
    stranger_ok = genuine_ok = both = 0
    for _ in range(trials):
        trio_and_stranger = rng.choice(people, 4, replace=False)
        enrolled, queries = [], []
        for p in trio_and_stranger[:3]:
            a, b = rng.choice(np.flatnonzero(labels == p), 2, replace=False)
            enrolled.append(x[a]), queries.append(x[b])
        stranger = x[rng.choice(np.flatnonzero(labels == trio_and_stranger[3]))]
        gallery = np.stack(enrolled)
        scores = np.stack(queries) @ gallery.T
        right = bool((scores.argmax(axis=1) == np.arange(3)).all() and (scores.max(axis=1) >= threshold).all())
        unknown = bool((stranger @ gallery.T).max() < threshold)
        stranger_ok += unknown
        genuine_ok += right
        both += unknown and right
    return stranger_ok / trials, genuine_ok / trials, both / trials


def speed(cache: Path) -> None:
    import dlib

    encoder = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache)
    reference = dlib.face_recognition_model_v1(str(model_file(NETWORK_FILE)))
    from PIL import Image
    from skimage import data as samples  # a real photo with one face, resized to 640x480

    astronaut = Image.fromarray(samples.astronaut()).resize((640, 480))
    buffer = io.BytesIO()
    astronaut.save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    chip = encoder.preprocess(jpeg)
    chips = np.stack([chip] * 16)
    hwc = np.ascontiguousarray(chip.transpose(1, 2, 0))
    ours = rate(lambda: len(encoder.embed(chips)), 5.0)
    theirs = rate(lambda: (reference.compute_face_descriptor(hwc), 1)[1], 5.0)
    locator = FaceLocator()
    photos_per_s = rate(lambda: len(encoder.instances(jpeg)) and 1, 5.0)
    print(f"face trunk, ONNX Runtime fp32 batch 16: {ours:.1f} faces/s ({1e3 / ours:.1f} ms/face); dlib "
          f"compute_face_descriptor: {theirs:.1f} faces/s ({1e3 / theirs:.1f} ms/face); {ours / theirs:.2f}x "
          "(target >= 5x)")
    print(f"detection + 5 landmarks + aligned chip, 640x480 photo with one face ({locator.mode}): "
          f"{1e3 / photos_per_s:.1f} ms/photo")
    cnn = create_encoder("face:cnn", device="cpu", runtime="onnx", cache_dir=cache)
    cnn_per_s = rate(lambda: len(cnn.instances(jpeg)) and 1, 5.0)
    print(f"the same with the CNN detector (face:cnn, one thread): {1e3 / cnn_per_s:.1f} ms/photo")
    from fewshot.face_cnn import MMOD_FILE, CNNFaceDetector

    rgb = np.asarray(astronaut)
    ours_cnn, dlib_cnn = CNNFaceDetector(model_file(MMOD_FILE), threads=1), dlib.cnn_face_detection_model_v1(
        str(model_file(MMOD_FILE)))
    ours_rate, dlib_rate = rate(lambda: len(ours_cnn(rgb)) and 1, 5.0), rate(lambda: len(dlib_cnn(rgb, 0)) and 1, 5.0)
    print(f"CNN detection alone, 640x480, one thread: ours {1e3 / ours_rate:.1f} ms, dlib's "
          f"cnn_face_detection_model_v1 {1e3 / dlib_rate:.1f} ms: {ours_rate / dlib_rate:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewshot-faces"))
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--write-reference", action="store_true")
    args = parser.parse_args()
    faces, cache = args.data / "faces" / "att_faces.zip", args.work / "cache"
    results = {}
    for spec, tag in [("face", "detect"), ("face:cnn", "cnn"), ("face:crop", "crop")]:
        x, rows = embedded(faces, args.work / f"emb-{tag}", spec, cache)
        errors = (args.work / f"emb-{tag}" / "errors.jsonl").read_text().splitlines()
        labels = np.array([person(r) for r in rows])
        print(f"{spec}: {len(rows)} photos embedded, {len(errors)} without a face found")
        for ways, shots, queries in [(40, 1, 5), (20, 5, 4)]:
            report = run_episodes(x, labels, ways, shots, queries, args.episodes, "prototype", seed=0)
            print(f"  {ways}-way {shots}-shot: {report.accuracy:.2f}% +- {report.ci95:.2f}")
        results[tag] = (x, labels)
    x, labels = results["detect"]
    ref = np.isin(labels, sorted(REFERENCE_PEOPLE))
    thresholds, impostors = far_thresholds(x[ref], labels[ref])
    print(f"reference operating point (s1-s20, {impostors} impostor pairs): " +
          ", ".join(f"FAR {far:g}: {t:.4f}" for far, t in thresholds.items()))
    if args.write_reference:
        encoder = create_encoder("face", device="cpu", runtime="onnx", cache_dir=cache)
        REFERENCE_DIR.mkdir(exist_ok=True)
        (REFERENCE_DIR / "face.json").write_text(json.dumps({
            "encoder": "face", "fingerprint": encoder.fingerprint, "head": "prototype",
            "data": "ORL / AT&T faces, people s1-s20 (10 photos each; s21-s40 are the test split), detect mode",
            "measured_by": "python bench/faces.py --write-reference", "impostor_pairs": impostors,
            "thresholds": {f"{far:g}": t for far, t in thresholds.items()}}, indent=1) + "\n")
        print(f"wrote {REFERENCE_DIR / 'face.json'}")
    test = ~ref
    stranger, genuine, both = stranger_test(x[test], labels[test], thresholds[0.01], args.trials)
    print(f"stranger test, {args.trials} trios of one-shot people from s21-s40, reference threshold at FAR 1% "
          f"({thresholds[0.01]:.4f}): stranger unknown in {stranger:.1%} of draws (target >= 95%), all three "
          f"genuine recognised and accepted in {genuine:.1%} (target >= 97%), both in {both:.1%}")
    speed(cache)


if __name__ == "__main__":
    main()
