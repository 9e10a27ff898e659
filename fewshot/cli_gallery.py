"""``fewshot gallery ...``: maintenance of the galleries of a data directory or a PostgreSQL database
(import, export, copy, re-embed, delete)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .encoders import create_encoder


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


def _gallery_delete(args: argparse.Namespace) -> int:
    from .gallery_store import GalleryStore

    store = GalleryStore(args.database_url or args.data_dir)
    try:
        store.delete(args.name)
    finally:
        store.close()
    print(f"deleted gallery {args.name} from {store.home.location}")
    return 0


def register(commands, encoder_args) -> None:
    """Add ``gallery`` and its sub-commands to the ``fewshot`` command."""
    gallery = commands.add_parser("gallery", help="gallery maintenance (stop a server using the same data first)")
    gallery_commands = gallery.add_subparsers(dest="gallery_command", required=True)
    again = gallery_commands.add_parser("reembed", help="re-embed a gallery with another encoder from its kept "
                                                        "original images (the REST route does it live)")
    again.add_argument("name", help="the gallery")
    _store_args(again)
    encoder_args(again)
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
    dump.add_argument("--format", choices=["npy", "parquet"], default="parquet", help="output layout")
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
    gone = gallery_commands.add_parser("delete", help="delete a gallery and everything of it (vectors, kept images, "
                                                      "change log, files)")
    gone.add_argument("name", help="the gallery")
    _store_args(gone)
    gone.set_defaults(run=_gallery_delete)
