"""The ``fewshot`` command: parse arguments, call the library, print."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points
from pathlib import Path

from .encoders import DEFAULT_ENCODER, create_encoder
from .errors import FewShotError


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
    print(f"wrote {report.count} embeddings to {report.out} ({fmt}); {report.errors} file(s) {skipped} "
          f"listed in {report.out / 'errors.jsonl'}; {report.images_per_second:.1f} images/s"
          + (f"; resumed with {report.resumed_shards} shard(s) already done" if report.resumed_shards else ""))
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
    try:
        report = run_episodes(embeddings, [r["label"] for r in rows], args.ways, args.shots, args.queries,
                              args.episodes, args.head, mean, args.seed)
    except ValueError as exc:
        print(f"fewshot: error: {exc}", file=sys.stderr)
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


def _gallery_reembed(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .gallery_store import GalleryStore
    from .reembed import encoder_embed, reembed

    encoder = create_encoder(args.encoder, device=args.device, runtime=args.runtime, cache_dir=args.cache_dir,
                             calibration=args.calibration)

    store = GalleryStore(args.database_url or args.data_dir)
    try:
        with tqdm(unit="img", desc="re-embed", disable=args.quiet, dynamic_ncols=True) as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            report = reembed(store, args.name, args.encoder, encoder.dim, encoder.fingerprint,
                             encoder_embed(encoder), progress)
    finally:
        store.close()
    print(f"gallery {report.gallery}: {report.examples} example(s) re-embedded with {report.encoder} "
          f"(fingerprint {report.fingerprint}) in {report.seconds:.1f} s"
          + (f"; {len(report.skipped)} left out (nothing to embed): ids "
             f"{', '.join(str(s['id']) for s in report.skipped[:20])}" if report.skipped else ""))
    return 0


def _gallery_import(args: argparse.Namespace) -> int:
    from .gallery_store import GalleryStore
    from .transfer import import_embedded

    store = GalleryStore(args.database_url or args.data_dir)
    try:
        report = import_embedded(store, args.out, args.gallery, batch_rows=args.batch_rows, progress=not args.quiet)
    finally:
        store.close()
    print(f"gallery {report.gallery}: imported {report.imported} example(s) in {report.seconds:.1f} s"
          + (f"; {report.already} row(s) were imported by an earlier run" if report.already else "")
          + (f"; skipped {report.skipped}: " + "; ".join(f"{n} {why}" for why, n in report.reasons.items())
             if report.skipped else ""))
    return 0


def _gallery_export(args: argparse.Namespace) -> int:
    from .gallery_store import GalleryStore
    from .transfer import export_gallery

    store = GalleryStore(args.database_url or args.data_dir)
    try:
        rows, out = export_gallery(store, args.name, args.out, format=args.format, progress=not args.quiet)
    finally:
        store.close()
    print(f"wrote {rows} example(s) of gallery {args.name} to {out} ({args.format})")
    return 0


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where galleries live (default ./data)")
    parser.add_argument("--database-url", type=_store_location, default=None, metavar="postgresql://...",
                        help="galleries in this PostgreSQL database instead (what `fewshot serve --database-url` uses)")


def _store_location(value: str) -> str:
    """``sqlite:DIR`` or a bare directory -> the directory; ``postgresql://...`` as given."""
    from .stores import is_database_url

    if is_database_url(value):
        return value
    if "://" in value:
        raise argparse.ArgumentTypeError(f"expected sqlite:DIR or postgresql://..., got {value!r}")
    return value.removeprefix("sqlite:") or "."


def _gallery_copy(args: argparse.Namespace) -> int:
    from .gallery_store import GalleryStore
    from .transfer import copy_galleries

    source = GalleryStore(args.source)
    where = source.home.location  # without a password
    try:
        target = GalleryStore(args.target)
        try:
            reports = copy_galleries(source, target, args.gallery, progress=not args.quiet)
        finally:
            target.close()
    finally:
        source.close()
    for r in reports:
        print(f"gallery {r.gallery}: copied {r.copied} example(s)"
              + (f" ({r.already} by an earlier run)" if r.already else "")
              + f", {r.images} with kept images, in {r.seconds:.1f} s; verified: {r.examples} example(s) in both, "
                "same ids, labels and vectors")
    if not reports:
        print(f"no galleries to copy in {where}")
    return 0


def _unfreeze_arg(value: str) -> str:
    if value != "all" and not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of units or 'all', got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Learn visual classes from a few images.")
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
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--workers", type=int, default=None,
                       help="decoding processes (default: one per core; 0: decode inline)")
    embed.add_argument("--shard-size", type=int, default=None,
                       help="images per resumable shard: an interrupted run redoes at most one shard "
                            "(default: about 1/50 of the job, 32 to 1024)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=_embed)

    evaluate = commands.add_parser("eval", help="N-way K-shot episodes over the output of `fewshot embed`")
    evaluate.add_argument("emb_dir", help="an OUT folder written by `fewshot embed`")
    evaluate.add_argument("--ways", type=int, default=5)
    evaluate.add_argument("--shots", type=int, default=1)
    evaluate.add_argument("--queries", type=int, default=15, help="queries per class per episode")
    evaluate.add_argument("--episodes", type=int, default=600)
    evaluate.add_argument("--head", choices=["prototype", "knn", "cache"], default="prototype")
    evaluate.add_argument("--center", action="store_true", help="subtract the mean of EMB_DIR (CL2N)")
    evaluate.add_argument("--center-from", help="subtract the mean of another embedded set (e.g. base classes)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--json", action="store_true", help='print {"accuracy": .., "ci95": .., ...}')
    evaluate.set_defaults(run=_eval)

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
    tune.add_argument("--epochs", type=int, default=20)
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
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.set_defaults(run=_finetune)

    gallery = commands.add_parser("gallery", help="gallery maintenance (stop a server using the same data first)")
    gallery_commands = gallery.add_subparsers(dest="gallery_command", required=True)
    again = gallery_commands.add_parser("reembed", help="re-embed a gallery with another encoder from its kept "
                                                        "original images (the REST route does it live)")
    again.add_argument("name", help="the gallery")
    _store_args(again)
    _encoder_args(again)
    again.add_argument("--quiet", action="store_true", help="no progress bar")
    again.set_defaults(run=_gallery_reembed)
    load = gallery_commands.add_parser("import", help="stream the output of `fewshot embed` into a gallery (labels "
                                                      "from the manifest; resumable; a running server picks it up)")
    load.add_argument("out", help="an OUT folder written by `fewshot embed` (npy or parquet)")
    load.add_argument("--gallery", required=True, help="the gallery (created with OUT's encoder when missing)")
    _store_args(load)
    load.add_argument("--batch-rows", type=int, default=10_000, help="rows per transaction")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    load.set_defaults(run=_gallery_import)
    dump = gallery_commands.add_parser("export", help="write a gallery's vectors and labels in the layout of "
                                                      "`fewshot embed`")
    dump.add_argument("name", help="the gallery")
    dump.add_argument("out", help="a new folder")
    _store_args(dump)
    dump.add_argument("--format", choices=["npy", "parquet"], default="parquet")
    dump.add_argument("--quiet", action="store_true", help="no progress bar")
    dump.set_defaults(run=_gallery_export)
    move = gallery_commands.add_parser("copy", help="copy galleries between stores (SQLite files <-> PostgreSQL) with "
                                                    "their images, then verify counts and vectors; resumable")
    move.add_argument("--from", dest="source", required=True, type=_store_location,
                      help="sqlite:DIR (a data directory) or postgresql://user:password@host/database")
    move.add_argument("--to", dest="target", required=True, type=_store_location, help="the same forms")
    move.add_argument("--gallery", action="append", default=None, help="only this gallery (repeatable; default all)")
    move.add_argument("--quiet", action="store_true", help="no progress bars")
    move.set_defaults(run=_gallery_copy)

    data = commands.add_parser("omniglot", help="write Omniglot's .npz as a folder of PNGs for `fewshot embed`")
    data.add_argument("npz", help="images_background.npz or images_evaluation.npz")
    data.add_argument("out")
    data.add_argument("--classes", type=int, default=None, help="only the first N characters")
    data.set_defaults(run=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except FewShotError as exc:
        print(f"fewshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nfewshot: interrupted; finished work is kept: run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
