"""Image sources for offline embedding: a folder tree, a .zip with the same layout, or a list file.

Every source yields ``Item(path, label)`` in a stable order (sorted), so that a resumed job sees
the same items in the same rows. ``read_bytes`` runs in worker processes; it opens zips lazily
and keeps one handle per process.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import InvalidSource
from .images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Item:
    path: str  # a file path, or "<archive.zip>!<member>" for zip members
    label: str | None


ZIP_SEPARATOR = "!"


def is_uri(src: str) -> bool:
    """``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``, ``file:///...``: read through pyarrow's filesystems."""
    return "://" in src.split(ZIP_SEPARATOR, 1)[0]


def list_items(src: str | Path) -> list[Item]:
    """SRC (folder, .zip or text file of paths, or a URI of a folder that pyarrow's filesystems read,
    e.g. ``s3://bucket/prefix``) -> items with labels from the folder layout."""
    if is_uri(str(src)):
        return _uri_items(str(src))
    src = Path(src).expanduser()
    if not src.exists():
        raise InvalidSource(f"{src} does not exist; give a folder, a .zip or a text file listing image paths")
    if src.is_dir():
        return _folder_items(src)
    if zipfile.is_zipfile(src):
        return _zip_items(src)
    return _list_file_items(src)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_SUFFIXES


def _label_of(relative: PurePosixPath) -> str | None:
    """``<label>/<image>``; deeper trees keep the whole folder path (``Greek/character01``)."""
    parent = relative.parent.as_posix()
    return None if parent in ("", ".") else parent


def _folder_items(root: Path) -> list[Item]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                path = Path(dirpath) / name
                items.append(Item(str(path), _label_of(PurePosixPath(path.relative_to(root).as_posix()))))
    items.sort(key=lambda item: item.path)
    if not items:
        raise InvalidSource(f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _uri_items(uri: str) -> list[Item]:
    """Every image under a folder URI (credentials as pyarrow's filesystems take them, e.g. the AWS
    environment variables for S3); paths stay URIs, so workers on other machines read them too."""
    from pyarrow import fs

    uri = uri.rstrip("/")
    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        infos = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError, NotImplementedError) as exc:
        raise InvalidSource(f"cannot list {uri}: {exc}. Check the URI and the credentials pyarrow uses for it") from None
    head = _uri_head(uri, root)
    items = [Item(head + info.path, _label_of(PurePosixPath(info.path).relative_to(root)))
             for info in infos if info.type == fs.FileType.File and _is_image_name(info.path)]
    items.sort(key=lambda item: item.path)
    if not items:
        raise InvalidSource(f"{uri} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


def _uri_head(uri: str, path: str) -> str:
    """What precedes a filesystem path in its URI: ``s3://`` (the bucket is in the path),
    ``hdfs://host:port``, ``file://``."""
    if not uri.endswith(path):
        raise InvalidSource(f"cannot tell the path in {uri} (pyarrow reads it as {path!r})")
    return uri[:len(uri) - len(path)]


def _zip_items(archive: Path) -> list[Item]:
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if not n.endswith("/") and _is_image_name(n))
    if not names:
        raise InvalidSource(f"{archive} holds no image files")
    prefix = _common_top_folder(names)
    return [Item(f"{archive.resolve()}{ZIP_SEPARATOR}{n}", _label_of(PurePosixPath(n[len(prefix):])))
            for n in names]


def _common_top_folder(names: list[str]) -> str:
    """A zip of ``dataset/<label>/<image>`` has one top folder that is not a label: drop it."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all(n.count("/") >= 2 for n in names):
        return tops.pop() + "/"
    return ""


def _list_file_items(listing: Path) -> list[Item]:
    """One image path per line (relative paths are relative to the list file); optional TAB label."""
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise InvalidSource(f"{listing} is neither a folder, a zip nor a UTF-8 list of paths: {exc}") from None
    items = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, _, label = line.rstrip("\n").partition("\t")
        file = Path(path.strip()).expanduser()
        file = file if file.is_absolute() else listing.parent / file
        items.append(Item(str(file), label.strip() or file.parent.name or None))
    if not items:
        raise InvalidSource(f"{listing} lists no image paths")
    return items


class Reader:
    """Reads an item's bytes; keeps each zip it meets open (one Reader per worker process)."""

    def __init__(self) -> None:
        self._zips: dict[str, zipfile.ZipFile] = {}
        self._filesystems: dict[str, object] = {}

    def read(self, path: str) -> bytes:
        """The bytes of a file, of ``archive.zip!member`` or of a URI; raises OSError/KeyError when unreadable."""
        if is_uri(path):
            return self._read_uri(path)
        archive, sep, member = path.partition(ZIP_SEPARATOR)
        if sep and archive.lower().endswith(".zip"):
            if archive not in self._zips:
                self._zips[archive] = zipfile.ZipFile(archive)
            return self._zips[archive].read(member)
        with open(path, "rb") as f:
            return f.read()

    def _read_uri(self, uri: str) -> bytes:
        from pyarrow import fs

        scheme, _, rest = uri.partition("://")
        key = f"{scheme}://{rest.split('/', 1)[0]}"  # one filesystem per bucket or host
        try:
            if key not in self._filesystems:
                filesystem, path = fs.FileSystem.from_uri(uri)
                self._filesystems[key] = (filesystem, _uri_head(uri, path))
            filesystem, head = self._filesystems[key]
            with filesystem.open_input_file(uri[len(head):]) as f:
                return f.read()
        except (ValueError, NotImplementedError, InvalidSource) as exc:
            raise OSError(str(exc)) from None


# ---------------------------------------------------------------- the shared evaluation data
# First canonical character id of each Omniglot alphabet (shared/data/PROVENANCE.md); ids are
# contiguous, background 1..964, evaluation 965..1623.
OMNIGLOT_ALPHABETS = [
    (1, "Arcadian"), (27, "Armenian"), (68, "Asomtavruli_(Georgian)"), (108, "Balinese"), (132, "Bengali"),
    (178, "Blackfoot_(Canadian_Aboriginal_Syllabics)"), (192, "Braille"), (218, "Cyrillic"),
    (251, "Early_Aramaic"), (273, "Syriac_(Estrangelo)"), (296, "Anglo-Saxon_Futhorc"), (325, "Futurama"),
    (351, "Grantha"), (394, "Greek"), (418, "Gujarati"), (466, "Hebrew"), (488, "Japanese_(hiragana)"),
    (540, "Inuktitut_(Canadian_Aboriginal_Syllabics)"), (556, "Malay_(Jawi_-_Arabic)"),
    (596, "Japanese_(katakana)"), (643, "Korean"), (683, "Latin"), (709, "Alphabet_of_the_Magi"),
    (729, "Mkhedruli_(Georgian)"), (770, "Burmese_(Myanmar)"), (804, "N_Ko"),
    (837, "Ojibwe_(Canadian_Aboriginal_Syllabics)"), (851, "Sanskrit"), (893, "Tagalog"), (910, "Tifinagh"),
    (965, "Angelic"), (985, "Atemayar_Qelisayer"), (1011, "Atlantean"), (1037, "Aurek-Besh"), (1063, "Avesta"),
    (1089, "Ge_ez"), (1115, "Glagolitic"), (1160, "Gurmukhi"), (1205, "Kannada"), (1246, "Keble"),
    (1272, "Malayalam"), (1319, "Manipuri"), (1359, "Mongolian"), (1389, "Old_Church_Slavonic_(Cyrillic)"),
    (1434, "Oriya"), (1480, "Syriac_(Serto)"), (1503, "Sylheti"), (1531, "Tengwar"), (1556, "Tibetan"),
    (1598, "ULOG"),
]


def omniglot_alphabet(character_id: int) -> str:
    starts = [start for start, _ in OMNIGLOT_ALPHABETS]
    return OMNIGLOT_ALPHABETS[int(np.searchsorted(starts, character_id, side="right")) - 1][1]


def export_omniglot(npz: str | Path, out: str | Path, classes: int | None = None) -> Path:
    """Omniglot's numpy export -> ``out/<alphabet>/<id>/<drawer>.png`` (black ink on white), the
    layout ``fewshot embed`` reads. ``classes`` keeps only the first N characters."""
    from PIL import Image

    data = dict(np.load(npz))
    images = data["images"]
    first_id = 1 if len(images) == 964 else 965  # background or evaluation set
    out = Path(out)
    count = len(images) if classes is None else min(classes, len(images))
    for c in range(count):
        folder = out / omniglot_alphabet(first_id + c) / f"{first_id + c:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for drawer, image in enumerate(images[c], start=1):
            target = folder / f"{drawer:02d}.png"
            if not target.exists():
                Image.fromarray(image.astype(np.uint8) * 255).save(target)
    return out


def omniglot_runs(archive: str | Path) -> list[list[tuple[str, str]]]:
    """The 20 official one-shot runs: per run, (test image, correct training image) member names."""
    with zipfile.ZipFile(archive) as z:
        runs = sorted({n.split("/")[0] for n in z.namelist() if n.endswith("class_labels.txt")})
        return [[tuple(line.split()) for line in z.read(f"{run}/class_labels.txt").decode().splitlines()
                 if line.strip()] for run in runs]
