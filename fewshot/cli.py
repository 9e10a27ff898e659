"""The ``fewshot`` command: parse arguments, call the library, print."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .encoders import DEFAULT_ENCODER, create_encoder
from .errors import FewShotError


def _encoder_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default=DEFAULT_ENCODER,
                        help="efficientnet_lite0 (default), timm:<name>[:<weights>], open_clip:<arch>[:<tag|weights>]")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="auto: PyTorch fp16 on a GPU, ONNX Runtime on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where exported ONNX models are kept (default ~/.cache/fewshot)")


def _embed(args: argparse.Namespace) -> int:
    from .embed import embed_dataset

    encoder = create_encoder(args.encoder, device=args.device, runtime=args.runtime, cache_dir=args.cache_dir)
    print(f"encoder: {encoder}", file=sys.stderr)
    report = embed_dataset(args.src, args.out, encoder, batch_size=args.batch_size, workers=args.workers,
                           shard_size=args.shard_size, progress=not args.quiet)
    print(f"wrote {report.count} embeddings ({encoder.dim}-d) to {report.out}; {report.errors} unreadable "
          f"file(s) listed in {report.out / 'errors.jsonl'}; {report.images_per_second:.1f} images/s"
          + (f"; resumed with {report.resumed_shards} shard(s) already done" if report.resumed_shards else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Learn visual classes from a few images.")
    commands = parser.add_subparsers(dest="command", required=True)
    embed = commands.add_parser("embed", help="embed a folder, .zip or list of images into OUT (resumable)")
    embed.add_argument("src", help="folder (SRC/<label>/<image>), .zip with that layout, or a text file of paths")
    embed.add_argument("out", help="output folder: embeddings.npy, manifest.jsonl, errors.jsonl, meta.json")
    _encoder_args(embed)
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core; 0: inline)")
    embed.add_argument("--shard-size", type=int, default=1024,
                       help="images per resumable shard: an interrupted run redoes at most one shard")
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(run=_embed)
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
