"""Frozen vs fine-tuned encoder on classes the fine-tuning never saw: Omniglot and faces.

    python bench/finetune.py [--data ../shared/data] [--work /tmp/fewshot-finetune] [--max-minutes 60]

Omniglot: `fewshot finetune` on the 964 background characters (105 px as drawn, or --image-size), then the 659
evaluation characters (other alphabets) embedded by both encoders: 5/20-way 1/5-shot episodes and
the official 20 one-shot runs (all_runs.zip). Faces: fine-tuned on people s1-s20 (kept even when
the guard says no, to show what it would have done), tested on s21-s40. Every step is the command a
user runs; results already in --work are reused (delete the folder to measure again).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fewshot.datasets import Reader, list_items, omniglot_runs
from fewshot.evaluate import omniglot_runs_error, run_episodes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embedded, fewshot  # noqa: E402

ANCHORS = {(5, 1): "98.8 (ProtoNet)", (20, 1): "96.0 (ProtoNet)", (5, 5): "99.7 (ProtoNet)",
           (20, 5): "98.9 (ProtoNet)"}


def finetuned(data: Path, out: Path, *options) -> dict:
    """Run `fewshot finetune` once (its report is kept in OUT) and return that report."""
    if not (out / "finetune.json").is_file():
        started = time.perf_counter()
        fewshot("finetune", data, out, *options, check=False)
        print(f"fine-tuning took {(time.perf_counter() - started) / 60:.1f} min wall-clock", file=sys.stderr)
    return json.loads((out / "finetune.json").read_text())


def row(encoder: str, task: str, value: str, note: str = "") -> None:
    print(f"| {encoder} | {task} | {value} | {note} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewshot-finetune"))
    parser.add_argument("--max-minutes", type=float, default=55, help="training budget of the Omniglot run")
    parser.add_argument("--unfreeze", default="9")
    parser.add_argument("--views", default="8")
    parser.add_argument("--image-size", default="105", help="input size of the Omniglot run (105: as drawn)")
    parser.add_argument("--batchnorm", default="train", help="train or frozen (see fewshot finetune --help)")
    parser.add_argument("--rotate-classes", action="store_true", help="pass --rotate-classes to the Omniglot run")
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--skip-faces", action="store_true")
    args = parser.parse_args()
    work, cache = args.work, args.work / "cache"
    omniglot = args.data / "omniglot"
    for split, folder in [("background", "omniglot-background"), ("evaluation", "omniglot-eval")]:
        if not (work / folder).exists():
            fewshot("omniglot", omniglot / f"images_{split}.npz", work / folder)

    tuned = work / "omniglot-tuned"
    meta = finetuned(work / "omniglot-background", tuned, "--image-size", args.image_size, "--unfreeze", args.unfreeze,
                     "--views", args.views, "--batchnorm", args.batchnorm, "--max-minutes", args.max_minutes, "--quiet",
                     *(["--rotate-classes"] if args.rotate_classes else []))
    report = meta["report"]
    print(f"\nOmniglot fine-tuning: {report['reason']}; {report['epochs']} epochs ({report['stopped']}), "
          f"training {report['seconds']['train'] / 60:.1f} min, everything {report['seconds']['total'] / 60:.1f} "
          f"min (cache {report['seconds']['cache'] / 60:.1f}, judge {report['seconds']['judge'] / 60:.1f})\n")
    runs = omniglot_runs(omniglot / "all_runs.zip")
    print("| encoder | task (evaluation alphabets, never trained on) | accuracy % (95% CI) | anchor |")
    print("|---|---|---|---|")
    encoders = [("efficientnet_lite0", "frozen")] + ([(f"finetuned:{tuned}", "tuned")] if meta["kept"] else [])
    for encoder, tag in encoders:
        x, rows = embedded(work / "omniglot-eval", work / f"emb-{tag}-eval", encoder, cache)
        labels = [r["label"] for r in rows]
        for ways, shots in [(5, 1), (20, 1), (5, 5), (20, 5)]:
            r = run_episodes(x, labels, ways, shots, 15, args.episodes, seed=0)
            row(encoder.split(":")[0], f"{ways}-way {shots}-shot", f"{r.accuracy:.1f} ± {r.ci95:.1f}",
                ANCHORS[(ways, shots)])
        run_x, run_rows = embedded(omniglot / "all_runs.zip", work / f"emb-{tag}-runs", encoder, cache)
        error = omniglot_runs_error(run_x, [r["path"] for r in run_rows], runs)
        row(encoder.split(":")[0], "official 20 runs (all_runs.zip), error %", f"{error:.1f}", "4.5 (people)")
    if not meta["kept"]:
        print("\nthe Omniglot fine-tuning was not kept by its guard: no fine-tuned rows")
    if not args.skip_faces:
        faces(args, work, cache)


def faces(args, work: Path, cache: Path) -> None:
    """People s1-s20 to fine-tune, s21-s40 to test: a person-disjoint split."""
    archive = args.data / "faces" / "att_faces.zip"
    train, test = work / "faces-s1-s20", work / "faces-s21-s40"
    if not test.exists():
        reader = Reader()
        for item in list_items(archive):  # labels s1..s40, as `fewshot embed` reads the zip
            target = (train if int(item.label[1:]) <= 20 else test) / item.label / item.path.rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(reader.read(item.path))
    tuned = work / "faces-tuned"
    meta = finetuned(train, tuned, "--val-classes", 0.3, "--keep-anyway", "--quiet")
    report = meta["report"]
    print(f"\nFaces fine-tuning on s1-s20 (guard on {report['judge_classes']} held-out people): {report['reason']}; "
          f"{report['epochs']} epochs ({report['stopped']}), {report['seconds']['total']:.0f} s\n")
    print("| encoder | task (people s21-s40, never trained on) | accuracy % (95% CI) | |")
    print("|---|---|---|---|")
    for encoder, tag in [("efficientnet_lite0", "frozen"), (f"finetuned:{tuned}", "tuned")]:
        x, rows = embedded(test, work / f"emb-{tag}-faces", encoder, cache)
        for ways, shots in [(20, 1), (20, 5)]:
            r = run_episodes(x, [r["label"] for r in rows], ways, shots, 10 - shots, args.episodes, seed=0)
            row(encoder.split(":")[0], f"{ways}-way {shots}-shot", f"{r.accuracy:.1f} ± {r.ci95:.1f}")


if __name__ == "__main__":
    main()
