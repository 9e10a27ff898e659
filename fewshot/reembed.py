"""Re-embed a gallery with another encoder from the original images it kept.

The new vectors are built beside the gallery (the store's ``scratch`` place: ``.<name>.reembed/`` for
SQLite, a hidden schema on PostgreSQL) from its kept originals while the old ones keep serving. Then,
under the gallery's write lock, what changed meanwhile (examples enrolled, removed or relabelled during
the job) is applied to the new one too, and the new gallery replaces the old in one step
(``Gallery.replace_with``; on PostgreSQL, retried after catching up if another replica wrote at that
moment): ids, labels, times and images are kept; the encoder, dimension and fingerprint are the new
encoder's. A crash before the swap leaves the old gallery as it was.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import Busy, InvalidArgument, InvalidImage
from .gallery import Gallery
from .gallery_store import GalleryStore
from .stores import ChangedMeanwhile

# Images -> one unit row per image, or None where the encoder finds nothing to embed (no face).
EmbedFn = Callable[[Sequence[bytes]], list[np.ndarray | None]]
BATCH = 32
SWAP_ATTEMPTS = 20  # catch-up-and-swap rounds while other replicas keep writing
SKIPPED = "nothing to embed: no face found, or the kept bytes no longer decode"


def encoder_embed(encoder, run: Callable[[np.ndarray], np.ndarray] | None = None) -> EmbedFn:
    """The ``EmbedFn`` of an encoder: each image's main instance (its largest face), None where there
    is none or the bytes no longer decode; ``run`` embeds stacked pixels (default ``encoder.embed``;
    the service passes its micro-batcher)."""
    run = run or encoder.embed

    def embed(images: Sequence[bytes]) -> list[np.ndarray | None]:
        mains = []
        for data in images:
            try:
                mains.append(encoder.preprocess(data))
            except InvalidImage:  # NoFace is one
                mains.append(None)
        pixels = [p for p in mains if p is not None]
        rows = iter(run(np.stack(pixels)) if pixels else [])
        return [next(rows) if p is not None else None for p in mains]

    return embed


@dataclass
class ReembedReport:
    gallery: str
    encoder: str
    fingerprint: str
    examples: int = 0  # re-embedded
    skipped: list[dict] = field(default_factory=list)  # {"id", "label", "reason"}: left out of the new gallery
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _copy(rows: list[dict], target: Gallery, embed: EmbedFn, report: ReembedReport) -> None:
    for start in range(0, len(rows), BATCH):
        part = rows[start:start + BATCH]
        vectors = embed([bytes(r["original"]) for r in part])
        kept = [(r, v) for r, v in zip(part, vectors) if v is not None]
        report.skipped += [{"id": r["id"], "label": r["label"], "reason": SKIPPED} for r, v in zip(part, vectors)
                           if v is None]
        if kept:
            target.import_rows([r for r, _ in kept], np.stack([v for _, v in kept]))
        report.examples += len(kept)


def _missing_originals(gallery: Gallery) -> int:
    missing, after = 0, -1
    while rows := gallery.rows.kept(after, 1024):
        missing += sum(r["original"] is None for r in rows)
        after = rows[-1]["id"]
    return missing


def reembed(store: GalleryStore, name: str, encoder: str, dim: int, fingerprint: str, embed: EmbedFn,
            progress: Callable[[int, int], None] | None = None) -> ReembedReport:
    """Re-embed gallery ``name`` with ``encoder`` (its ``dim`` and ``fingerprint``) through ``embed``."""
    started = time.perf_counter()
    report = ReembedReport(name, encoder, fingerprint)
    with store.use(name) as old:
        if (missing := _missing_originals(old)) > 0:
            raise InvalidArgument(f"gallery {name!r} did not keep the original image of {missing} example(s) "
                                  "(FEWSHOT_KEEP_IMAGES was thumbnail or none when they were enrolled): re-embedding "
                                  "needs them; enroll those classes again, or make a new gallery")
        scratch = store.home.scratch(name)  # beside the gallery, unlisted: the old one keeps serving
        target = Gallery(scratch, dim, fingerprint, encoder, old.index_kind)
        try:
            total, after = len(old), -1
            while rows := old.rows.kept(after, BATCH * 4):  # the bulk, while the old gallery keeps serving
                _copy(rows, target, embed, report)
                after = rows[-1]["id"]
                if progress:
                    progress(report.examples + len(report.skipped), total)
            with old.exclusive():  # the rest, with this process's writes to the old gallery held for the swap
                for _ in range(SWAP_ATTEMPTS):
                    _catch_up(old, target, embed, report)
                    target.set_version(old.version + 1)
                    try:
                        old.replace_with(target)
                        break
                    except ChangedMeanwhile:  # another replica wrote to it just now: take that in too
                        old.follow()
                else:
                    raise Busy(f"gallery {name!r} kept changing through other replicas during {SWAP_ATTEMPTS} "
                               "attempts to swap in its re-embedding; retry when enrollment is quieter")
        finally:
            target.close()
            store.home.discard(scratch)
    report.seconds = time.perf_counter() - started
    return report


def _catch_up(old: Gallery, target: Gallery, embed: EmbedFn, report: ReembedReport) -> None:
    """Apply to ``target`` what changed in ``old`` since the bulk copy (call under old's lock)."""
    now, built = old.labels_by_id(), target.labels_by_id()
    skipped = {s["id"] for s in report.skipped}
    for example_id in sorted(set(built) - set(now)):  # removed meanwhile
        target.remove_example(example_id)
        report.examples -= 1
    for example_id, label in now.items():  # relabelled meanwhile
        if example_id in built and built[example_id] != label:
            target.relabel_example(example_id, label)
    new_ids = sorted(set(now) - set(built) - skipped)
    rows = [r for r in old.rows.kept(min(new_ids) - 1, len(now)) if r["id"] in set(new_ids)] if new_ids else []
    _copy(rows, target, embed, report)
