"""The ``fewshot`` command: parse arguments, call the library, print."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .encoders import DEFAULT_ENCODER, create_encoder
from .cli_gallery import register as register_gallery
from .errors import FewShotError
from .runtimes import TORCH_PACKAGES, torch_missing_message


def _encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="efficientnet_lite0 (default), face (every photo's largest face; face:crop for face "
                             "crops), timm:<name>[:<weights>], open_clip:<arch>[:<tag|weights>]")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx", "onnx-int8"], default="auto",
                        help="auto: PyTorch fp16 on a GPU, ONNX Runtime on the CPU; onnx-int8: quantised "
                             "(faster on CPU, needs --calibration)")
    parser.add_argument("--calibration", default=None,
                        help="images like the ones to embed (folder, .zip or list), for --runtime onnx-int8")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where exported ONNX models are kept (default ~/.cache/fewshot)")


def _embed(args: argparse.Namespace) -> int:
    fmt = args.format or ("parquet" if args.engine == "ray" else "npy")
    if args.engine == "ray":
        from .ray_engine import embed_dataset_ray

        if args.runtime != "auto" or args.device != "auto":
            raise FewShotError("--engine ray picks the runtime per actor (ONNX Runtime on CPU actors, PyTorch fp16 "
                               "on GPU actors); drop --runtime/--device, use --gpus-per-actor for GPUs")
        report = embed_dataset_ray(args.src, args.out, args.encoder, address=args.ray_address, actors=args.actors,
                                   gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
                                   batch_size=args.batch_size, shard_size=args.shard_size, format=fmt,
                                   cache_dir=args.cache_dir, progress=not args.quiet)
        faces = args.encoder.split(":")[0] == "face"
    else:
        from .embed import embed_dataset

        encoder = create_encoder(args.encoder, device=args.device, runtime=args.runtime, cache_dir=args.cache_dir,
                                 calibration=args.calibration)
        print(f"encoder: {encoder}", file=sys.stderr)
        report = embed_dataset(args.src, args.out, encoder, batch_size=args.batch_size, workers=args.workers,
                               shard_size=args.shard_size, progress=not args.quiet, format=fmt)
        faces = encoder.finds_faces
    if report.already_done:
        print(f"nothing to do: {report.out} already holds this finished job ({report.count} embeddings, "
              f"{report.errors} unreadable file(s)); delete it to embed again")
        return 0
    skipped = "unreadable or with no face" if faces else "unreadable"
    if report.unlabelled:
        print(f"fewshot: warning: {report.unlabelled} image(s) lie outside any class folder, so their label is null; "
              "put each class's images in SRC/<label>/ to have them labelled", file=sys.stderr)
    print(f"wrote {report.count} embeddings to {report.out} ({fmt}); {report.errors} file(s) {skipped} "
          f"listed in {report.out / 'errors.jsonl'}; {report.images_per_second:.1f} images/s"
          + (f"; resumed with {report.resumed_shards} shard(s) already done" if report.resumed_shards else ""))
    if report.count == 0:
        print(f"fewshot: error: nothing could be embedded: every one of the {report.errors} file(s) failed; the "
              f"reasons are in {report.out / 'errors.jsonl'}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from .embedded import load_embedded
    from .evaluate import run_episodes

    embeddings, rows, meta = load_embedded(args.emb_dir)
    mean = None
    if args.center_from:
        mean = np.asarray(load_embedded(args.center_from)[0]).mean(axis=0)
    elif args.center:
        mean = np.asarray(embeddings).mean(axis=0)
    labels = [r["label"] for r in rows]
    try:
        report = run_episodes(embeddings, labels, args.ways, args.shots, args.queries,
                              args.episodes, args.head, mean, args.seed)
    except ValueError as exc:
        print(f"fewshot: error: {exc}. {_what_the_data_allows(labels, args)}", file=sys.stderr)
        return 2
    result = {**report.to_dict(), "encoder": meta["encoder"], "fingerprint": meta["fingerprint"]}
    if args.json:
        print(json.dumps(result))
    else:
        auroc = "n/a (no held-out classes)" if report.auroc is None else f"{report.auroc:.3f}"
        print(f"{report.ways}-way {report.shots}-shot, head {report.head}{' centred' if mean is not None else ''}, "
              f"{report.episodes} episodes: accuracy {report.accuracy:.2f}% +- {report.ci95:.2f} (95% CI); "
              f"open-set AUROC {auroc}")
    return 0


def _what_the_data_allows(labels: list, args: argparse.Namespace) -> str:
    """What an embedded set holds, and episode settings it does support."""
    from collections import Counter

    counts = sorted(Counter(label for label in labels if label is not None).values(), reverse=True)
    if len(counts) < 2:
        return (f"The data has {len(counts)} labelled class(es) ({len(labels)} embeddings): episodes need at least "
                "2 classes; embed a folder of SRC/<label>/<image> with several class folders")
    ways = min(args.ways, len(counts))
    per_class = counts[ways - 1]  # the fewest examples among the `ways` largest classes
    hint = (f"--ways {ways} --shots {max(1, min(args.shots, per_class - 1))} --queries "
            f"{max(1, per_class - max(1, min(args.shots, per_class - 1)))}")
    return (f"The data has {len(counts)} labelled classes with {counts[-1]} to {counts[0]} examples each; "
            f"try {hint}" if per_class >= 2 else
            f"The data has {len(counts)} labelled classes, most with 1 example: each class needs at least 2 "
            "(one support, one query)")


def _data(args: argparse.Namespace) -> int:
    from .datasets import export_omniglot

    out = export_omniglot(args.npz, args.out, args.classes)
    print(f"wrote Omniglot images to {out}; next: fewshot embed {out} <OUT>")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    unfreeze = args.unfreeze if args.unfreeze == "all" else int(args.unfreeze)
    config = FinetuneConfig(encoder=args.encoder, unfreeze=unfreeze, method=args.method, epochs=args.epochs,
                            lr=args.lr, image_size=args.image_size, val_classes=args.val_classes,
                            views=args.views, augment=args.augment, rotate_classes=args.rotate_classes,
                            ways=args.ways, batchnorm=args.batchnorm, max_minutes=args.max_minutes,
                            keep_anyway=args.keep_anyway, device=args.device, seed=args.seed,
                            workers=args.workers)
    report = finetune(args.data, args.out, config, progress=not args.quiet,
                      log=lambda line: print(line, file=sys.stderr))
    print(report.reason)
    print(f"trained {report.epochs} epoch(s) ({report.stopped}) in {report.seconds['total'] / 60:.1f} min; "
          f"best held-out accuracy while training {report.best_validation:.2f}%")
    if not report.kept:
        print(f"fewshot: the fine-tuned encoder in {report.out} is NOT kept: it did not beat the base encoder on "
              "held-out classes beyond the uncertainty. Try more data or other settings (--unfreeze, --lr, "
              "--image-size), or pass --keep-anyway to use it regardless", file=sys.stderr)
        return 1
    print(f"use it: fewshot embed SRC EMB_OUT --encoder finetuned:{report.out}")
    return 0


def _unfreeze_arg(value: str) -> str:
    if value != "all" and not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of units or 'all', got {value!r}")
    return value


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it says it already or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _with_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-command's parser the formatter above."""
    parser.formatter_class = _Help
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _with_help(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="fewshot", description="Learn visual classes from a few images.")
    parser.add_argument("--version", action="version", version=f"fewshot {version('fewshot')}")
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a folder, .zip or list of images into OUT (resumable)")
    embed.add_argument("src", help="folder (SRC/<label>/<image>), .zip with that layout, a text file of paths, or "
                                   "a folder URI pyarrow reads (s3://bucket/prefix, gs://..., hdfs://...)")
    embed.add_argument("out", help="output folder: embeddings.npy + manifest.jsonl (npy) or parts/*.parquet "
                                   "(parquet), with errors.jsonl and meta.json")
    _encoder_args(embed)
    embed.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this machine's processes (default); ray: a Ray Data pipeline on a local Ray "
                            "instance, or on the cluster at --ray-address")
    embed.add_argument("--format", choices=["npy", "parquet"], default=None,
                       help="output layout (default: npy for local, parquet for ray)")
    embed.add_argument("--ray-address", default=None,
                       help="a Ray cluster to join (e.g. ray://head:10001 or auto); default: start one here")
    embed.add_argument("--actors", type=int, default=None,
                       help="ray: encoder actors (default: 1 on a local instance, else as many as the cluster holds)")
    embed.add_argument("--gpus-per-actor", type=float, default=0.0,
                       help="ray: GPUs per encoder actor (PyTorch fp16 on them); 0: CPU actors (ONNX Runtime)")
    embed.add_argument("--cpus-per-actor", type=float, default=1.0,
                       help="ray: CPUs each CPU actor reserves, and the threads its runtime uses")
    embed.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    embed.add_argument("--workers", type=int, default=None,
                       help="decoding processes (default: one per core; 0: decode inline)")
    embed.add_argument("--shard-size", type=int, default=None,
                       help="images per resumable shard: an interrupted run redoes at most one shard "
                            "(default: about 1/50 of the job, 32 to 1024)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=_embed)

    evaluate = commands.add_parser("eval", help="N-way K-shot episodes over the output of `fewshot embed`")
    evaluate.add_argument("emb_dir", help="an OUT folder written by `fewshot embed`")
    evaluate.add_argument("--ways", type=int, default=5, help="classes per episode")
    evaluate.add_argument("--shots", type=int, default=1, help="support examples per class")
    evaluate.add_argument("--queries", type=int, default=15, help="queries per class per episode")
    evaluate.add_argument("--episodes", type=int, default=600, help="episodes to average over")
    evaluate.add_argument("--head", choices=["prototype", "knn", "cache"], default="prototype",
                          help="how support examples score a query")
    evaluate.add_argument("--center", action="store_true", help="subtract the mean of EMB_DIR (CL2N)")
    evaluate.add_argument("--center-from", help="subtract the mean of another embedded set (e.g. base classes)")
    evaluate.add_argument("--seed", type=int, default=0, help="random seed of the episodes")
    evaluate.add_argument("--json", action="store_true", help='print {"accuracy": .., "ci95": .., ...}')
    evaluate.set_defaults(run=_eval)

    register_gallery(commands, _encoder_args)
    for plugin in entry_points(group="fewshot.commands"):  # e.g. `serve`, from the service package
        plugin.load()(commands)

    tune = commands.add_parser("finetune", help="fine-tune the encoder's top layers on labelled images, guarded")
    tune.add_argument("data", help="labelled images: folder DATA/<class>/<image>, a .zip of it, or a list file")
    tune.add_argument("out", help="output folder: model.safetensors + finetune.json (encoder spec finetuned:OUT)")
    tune.add_argument("--encoder", default=DEFAULT_ENCODER, help="base encoder (timm EfficientNet/ResNet style)")
    tune.add_argument("--unfreeze", default="6", type=_unfreeze_arg,
                      help="top units to train (residual blocks and the final conv), or all (default 6)")
    tune.add_argument("--method", choices=["protonet", "cosine"], default="protonet",
                      help="episodic prototypical loss, or a cosine classifier over the training classes")
    tune.add_argument("--epochs", type=int, default=20, help="training epochs at most (early stopping may end sooner)")
    tune.add_argument("--ways", type=int, default=60,
                      help="classes per training episode (protonet; harder episodes than the test's teach more)")
    tune.add_argument("--batchnorm", choices=["train", "frozen"], default="train",
                      help="train: batch statistics; frozen: re-estimated on the data once, then fixed (faster steps)")
    tune.add_argument("--lr", type=float, default=1e-3, help="for the head and the top unit; lower units get less")
    tune.add_argument("--image-size", type=int, default=None,
                      help="input size in pixels (default: the encoder's; e.g. 105 for Omniglot)")
    tune.add_argument("--val-classes", type=float, default=0.1,
                      help="fraction of classes held out to stop early and to judge the result")
    tune.add_argument("--views", type=int, default=3, help="cached views per image (1 plain + augmented)")
    tune.add_argument("--augment", choices=["auto", "shapes", "photos", "none"], default="auto",
                      help="auto: photos (flip, colour) for colour images, shapes (small warps) for grey ones")
    tune.add_argument("--rotate-classes", action="store_true",
                      help="a class turned by 90/180/270 degrees is a new class (glyphs, symbols; not photos)")
    tune.add_argument("--max-minutes", type=float, default=None,
                      help="stop training this many minutes after the start (decoding and caching included)")
    tune.add_argument("--keep-anyway", action="store_true", help="keep the result even if it did not help")
    tune.add_argument("--device", default="auto", help="auto, cpu or cuda")
    tune.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    tune.add_argument("--seed", type=int, default=0, help="random seed")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(run=_finetune)

    data = commands.add_parser("omniglot", help="write Omniglot's .npz as a folder of PNGs for `fewshot embed`")
    data.add_argument("npz", help="images_background.npz or images_evaluation.npz")
    data.add_argument("out", help="a new folder of <alphabet>/<character>/<image>.png")
    data.add_argument("--classes", type=int, default=None, help="only the first N characters")
    data.set_defaults(run=_data)
    return _with_help(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FewShotError as exc:
        print(f"fewshot: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # fine-tuning, adapting, exporting in a serving-only install
        if (exc.name or "").split(".")[0] not in TORCH_PACKAGES:
            raise
        print(f"fewshot: error: {torch_missing_message(f'fewshot {args.command}', exc.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfewshot: interrupted; finished work is kept: run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
