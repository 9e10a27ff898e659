"""Few-shot accuracy on the shared real data, every head with and without centring, and raw pixels.

    python bench/accuracy.py [--data ../shared/data] [--work /tmp/fewshot-accuracy] [--episodes 600]

Reproduces the README table with the same commands a user runs: `fewshot omniglot` to write the
images, `fewshot embed` to embed them, then the evaluation behind `fewshot eval` (and the official
20 one-shot runs of all_runs.zip). Embeddings are kept in --work, so a second run only evaluates.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fewshot.datasets import omniglot_runs
from fewshot.evaluate import omniglot_runs_error, run_episodes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import embedded, fewshot  # noqa: E402

ANCHORS = {"omniglot 5-way 1-shot": "98.8 (ProtoNet, trained on background)",
           "omniglot 20-way 1-shot": "96.0 (ProtoNet, trained on background)",
           "omniglot official 20 runs, error": "4.5 (people)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fewshot-accuracy"))
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--base-classes", type=int, default=200,
                        help="background characters whose mean centres Omniglot (SimpleShot's base mean)")
    args = parser.parse_args()
    work, cache = args.work, args.work / "cache"
    omniglot = args.data / "omniglot"
    if not (work / "omniglot-eval").exists():
        fewshot("omniglot", str(omniglot / "images_evaluation.npz"), str(work / "omniglot-eval"))
    if not (work / "omniglot-base").exists():
        fewshot("omniglot", str(omniglot / "images_background.npz"), str(work / "omniglot-base"),
                "--classes", str(args.base_classes))
    runs = omniglot_runs(omniglot / "all_runs.zip")

    print("| encoder | task | head | centred | accuracy % (95% CI) | open-set AUROC | anchor |")
    print("|---|---|---|---|---|---|---|")
    for encoder, tag in [("efficientnet_lite0", "lite0"), ("pixels:32", "pixels")]:
        evaluation = embedded(work / "omniglot-eval", work / f"emb-{tag}-omniglot-eval", encoder, cache)
        base = embedded(work / "omniglot-base", work / f"emb-{tag}-omniglot-base", encoder, cache)
        run_images = embedded(omniglot / "all_runs.zip", work / f"emb-{tag}-runs", encoder, cache)
        faces = embedded(args.data / "faces" / "att_faces.zip", work / f"emb-{tag}-faces", encoder, cache)
        base_mean = base[0].mean(axis=0)
        tasks = [("omniglot", evaluation, ways, shots, 15, base_mean) for ways in (5, 20) for shots in (1, 5)]
        tasks.append(("faces", faces, 40, 1, 9, faces[0].mean(axis=0)))
        heads = ["prototype", "knn", "cache"] if tag == "lite0" else ["prototype"]
        for head in heads:
            for centred in (False, True):
                for name, (x, rows), ways, shots, queries, mean in tasks:
                    report = run_episodes(x, [r["label"] for r in rows], ways, shots, queries, args.episodes,
                                          head, mean if centred else None, seed=0)
                    task = f"{name} {ways}-way {shots}-shot"
                    auroc = "" if report.auroc is None else f"{report.auroc:.3f}"
                    print(f"| {encoder} | {task} | {head} | {'yes' if centred else 'no'} | "
                          f"{report.accuracy:.1f} ± {report.ci95:.1f} | {auroc} | {ANCHORS.get(task, '')} |",
                          flush=True)
                error = omniglot_runs_error(run_images[0], [r["path"] for r in run_images[1]], runs, head,
                                            base_mean if centred else None)
                task = "omniglot official 20 runs, error"
                print(f"| {encoder} | {task} | {head} | {'yes' if centred else 'no'} | {error:.1f} (error) |  | "
                      f"{ANCHORS[task]} |", flush=True)
        if tag == "lite0":
            adapted_rows(base, evaluation, faces, runs, run_images, args.episodes)


def adapted_rows(base, evaluation, faces, runs, run_images, episodes: int) -> None:
    """Frozen vs adapted, the adapter trained on other classes than those it is tested on:
    Omniglot: on the base (background) characters; faces: on people s1-s20, tested on s21-s40."""
    from fewshot.adapt import train_adapter

    labels = np.array([r["label"] for r in evaluation[1]])
    thousand = np.isin(labels, np.unique(labels)[:50])  # 50 characters x 20 drawers
    _, report = train_adapter(evaluation[0][thousand], labels[thousand], time_budget_s=300)
    print(f"| adapter on {thousand.sum()} enrolled examples | {report.seconds:.1f} s to train and judge "
          f"({report.epochs} epochs, stopped by {report.stopped}; target <= 30 s): {report.reason} | | | | | |")
    faces_x, faces_rows = faces
    faces_labels = np.array([r["label"] for r in faces_rows])
    first_half = np.isin(faces_labels, [f"s{i}" for i in range(1, 21)])
    for name, (train_x, train_labels), (test_x, test_labels), tasks in [
        ("omniglot", (base[0], [r["label"] for r in base[1]]), (evaluation[0], [r["label"] for r in evaluation[1]]),
         [(5, 1, 15), (5, 5, 15), (20, 1, 15), (20, 5, 15)]),
        ("faces s21-s40", (faces_x[first_half], faces_labels[first_half]),
         (faces_x[~first_half], faces_labels[~first_half]), [(20, 1, 9)]),
    ]:
        adapter, report = train_adapter(train_x, train_labels, time_budget_s=60)
        print(f"| adapter for {name} | trained on other classes: {report.reason} "
              f"({report.train_examples} examples, {report.epochs} epochs, {report.seconds:.0f} s) | | | | | |")
        if adapter is None:
            continue
        for ways, shots, queries in tasks:
            for variant, x in [("frozen", test_x), ("adapted", adapter.apply(test_x))]:
                r = run_episodes(x, test_labels, ways, shots, queries, episodes, "prototype", seed=0)
                auroc = "" if r.auroc is None else f"{r.auroc:.3f}"
                print(f"| efficientnet_lite0 {variant} | {name} {ways}-way {shots}-shot | prototype | no | "
                      f"{r.accuracy:.1f} ± {r.ci95:.1f} | {auroc} | |", flush=True)
        if name == "omniglot":
            for variant, x in [("frozen", run_images[0]), ("adapted", adapter.apply(run_images[0]))]:
                error = omniglot_runs_error(x, [r["path"] for r in run_images[1]], runs)
                print(f"| efficientnet_lite0 {variant} | omniglot official 20 runs, error | prototype | no | "
                      f"{error:.1f} (error) | | 4.5 (people) |", flush=True)


if __name__ == "__main__":
    main()
