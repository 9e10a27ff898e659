"""Which galleries are open: named galleries (one per tenant) in one place, a data directory of SQLite
files or a PostgreSQL database (``postgresql://...``) that other processes and replicas share.

At most ``max_open`` are open. Past it, the least recently used gallery that nobody is using (see
``use``) is closed: its memory goes and comes back from its snapshot on the next use. ``on_close(name)``
lets the owner drop what it derived from a closed gallery. Open galleries follow what other processes
commit to them (``Gallery.follow``, called here when the store's home announces a change).

Opening, evicting and describing touch the disk or the database: call them from a worker thread, never
from an event loop.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import FingerprintMismatch, InvalidArgument, UnknownGallery
from .gallery import Gallery
from .stores import Home, open_home
from .validate import check_name


class GalleryStore:
    def __init__(self, location: str | Path, max_open: int | None = None,
                 on_close: Callable[[str], None] | None = None) -> None:
        if max_open is not None and max_open < 1:
            raise InvalidArgument(f"max_open must be at least 1, got {max_open}")
        self.home: Home = open_home(location)
        self.root: Path | None = getattr(self.home, "root", None)  # the data directory; None on PostgreSQL
        self.kind = "sqlite" if self.root is not None else "postgresql"
        self.max_open, self.on_close = max_open, on_close
        self._open: OrderedDict[str, Gallery] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}
        self._deleting: set[str] = set()
        self._lock = threading.Lock()
        self.home.follow(self._changed, self._everything)

    def _changed(self, name: str) -> None:
        with self._lock:
            gallery = self._open.get(name)
        if gallery is not None:
            self._follow(gallery)

    def _everything(self) -> None:
        for gallery in self.opened().values():
            self._follow(gallery)

    def _follow(self, gallery: Gallery) -> None:
        try:
            gallery.follow()
        except UnknownGallery:  # another process deleted it: this copy goes too
            with self._lock:
                if self._open.get(gallery.name) is gallery:
                    del self._open[gallery.name]
                    self._users.pop(gallery.name, None)
            self._closed([gallery])

    def delete(self, name: str) -> None:
        """Delete gallery ``name`` and everything of it (vectors, images, change log, files); requests
        still using it here get GalleryClosed. UnknownGallery if there is none."""
        name = check_name(name)
        with self._lock:
            if name in self._deleting:
                raise UnknownGallery(f"gallery {name!r} is being deleted")
            self._deleting.add(name)
            gallery = self._open.pop(name, None)
            self._users.pop(name, None)
        try:
            if gallery is not None:
                self._closed([gallery])
            if not self.home.delete(name):
                raise UnknownGallery(f"no gallery {name!r}")
        finally:
            with self._lock:
                self._deleting.discard(name)

    def names(self) -> list[str]:
        return self.home.names()

    def describe(self, name: str) -> dict | None:
        """A gallery's encoder, dim and fingerprint without opening it (None if there is no such gallery)."""
        name = check_name(name)
        with self._lock:
            if name in self._open:
                g = self._open[name]
                return {"encoder": g.encoder, "dim": g.dim, "fingerprint": g.fingerprint}
        meta = self.home.describe(name)
        if not meta or "dim" not in meta:
            return None
        return {"encoder": meta.get("encoder", ""), "dim": int(meta["dim"]), "fingerprint": meta["fingerprint"]}

    def get(self, name: str, dim: int | None = None, fingerprint: str | None = None, encoder: str = "",
            create: bool = False, index: str = "exact") -> Gallery:
        """An open gallery; ``create`` makes it when missing, else UnknownGallery."""
        gallery = self.lease(name, dim, fingerprint, encoder, create, index)
        self.release(gallery.name)
        return gallery

    @contextmanager
    def use(self, name: str, dim: int | None = None, fingerprint: str | None = None, encoder: str = "",
            create: bool = False, index: str = "exact") -> Iterator[Gallery]:
        """Like ``get``, and the gallery stays open (is never evicted) until the block ends."""
        gallery = self.lease(name, dim, fingerprint, encoder, create, index)
        try:
            yield gallery
        finally:
            self.release(gallery.name)

    def lease(self, name: str, dim: int | None = None, fingerprint: str | None = None, encoder: str = "",
              create: bool = False, index: str = "exact") -> Gallery:
        """``use`` in two calls, for callers that open in one thread and finish in another: the gallery
        stays open until ``release(name)``. Given ``dim`` and ``fingerprint`` must be the gallery's."""
        name = check_name(name)
        with self._lock:
            if name in self._deleting:
                raise UnknownGallery(f"gallery {name!r} is being deleted")
            if name not in self._open:
                if not create and not self.home.exists(name):
                    raise UnknownGallery(f"no gallery {name!r}; enroll a class into it to create it")
                self._open[name] = Gallery(self.home.open(name), dim, fingerprint, encoder, index)
            gallery = self._held(name)
            closing = self._evict()
        self._closed(closing)
        if (dim, fingerprint) != (None, None) and (gallery.dim, gallery.fingerprint) != (dim, fingerprint):
            self.release(name)
            raise FingerprintMismatch(f"gallery {name!r} holds {gallery.dim}-d vectors of fingerprint "
                                      f"{gallery.fingerprint}; got {dim}-d, {fingerprint}. Re-embed, never mix")
        return gallery

    def lease_if_open(self, name: str) -> Gallery | None:
        """``lease`` for a gallery already open here, else None: no disk or database work, so an event
        loop may call it (and take the thread hop of ``lease`` only to open one)."""
        with self._lock:
            return self._held(name) if name in self._open else None

    def _held(self, name: str) -> Gallery:
        """Under the lock: the open gallery ``name``, now the most recently used, with one user more."""
        self._open.move_to_end(name)
        self._users[name] = self._users.get(name, 0) + 1
        return self._open[name]

    def release(self, name: str) -> None:
        self.close_evicted(self.unlease(name))

    def unlease(self, name: str) -> list[Gallery]:
        """``release`` without the closing: the galleries now evicted, for ``close_evicted`` (which saves
        their snapshots: disk work). No disk or database work itself."""
        with self._lock:
            if name in self._users:  # not after close() emptied the store
                self._users[name] -= 1
            return self._evict()

    def close_evicted(self, galleries: list[Gallery]) -> None:
        self._closed(galleries)

    def _evict(self) -> list[Gallery]:
        """Under the lock: take the least recently used idle galleries out, past ``max_open``."""
        out = []
        if self.max_open is None:
            return out
        for name in list(self._open):
            if len(self._open) <= self.max_open:
                break
            if not self._users.get(name):
                out.append(self._open.pop(name))
                self._users.pop(name, None)
        return out

    def _closed(self, galleries: list[Gallery]) -> None:
        for gallery in galleries:
            gallery.close()
            if self.on_close:
                self.on_close(gallery.name)

    def opened(self) -> dict[str, Gallery]:
        """The galleries open in this process, by name."""
        with self._lock:
            return dict(self._open)

    def close(self) -> None:
        with self._lock:
            galleries = list(self._open.values())
            self._open.clear()
            self._users.clear()
        try:
            self._closed(galleries)
        finally:
            self.home.close()
