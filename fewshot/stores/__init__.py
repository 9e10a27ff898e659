"""Where galleries live: SQLite files in a data directory (the embedded default) or one PostgreSQL
database shared by every replica.

A *home* holds named galleries (``names``, ``exists``, ``describe``, ``open``); ``open`` gives the
``Database`` of one gallery, which ``fewshot.gallery.Gallery`` reads and writes through three kinds of
access, each a context manager yielding ``Sql``:

- ``read()``: statements that each see the latest committed state;
- ``snapshot()``: one consistent read-only view (building an index from many pages of rows);
- ``write(wait)``: one transaction, serialised with every other writer of the same gallery (in any
  process), committed when the block ends and rolled back on any error.

The SQL is written once with ``?`` placeholders and portable statements (``RETURNING``,
``ON CONFLICT``); values are always bound, never formatted in. A home also says when other processes
have committed (``changed`` on SQLite's data version; a listener thread on PostgreSQL), so every
process keeps its in-memory index in step through the gallery's change log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Iterable, Protocol, Sequence


class Sql(Protocol):
    def execute(self, sql: str, params: Sequence = ()):
        """Run one statement; returns a DB-API cursor (fetchone, fetchall, fetchmany, description)."""

    def executemany(self, sql: str, rows: Iterable[Sequence]) -> None: ...

    def insert_ids(self, sql: str, rows: Sequence[Sequence]) -> list[int]:
        """Run an INSERT once per row; the new rows' ids (``RETURNING id``), in order."""

    def ids_taken(self) -> None:
        """After inserting explicit example ids: later automatic ids continue above them."""


class Database(Protocol):
    name: str
    folder: Path | None  # where derived files (index snapshot) may be cached; None: nowhere
    kind: str  # "sqlite" | "postgresql"

    def read(self) -> ContextManager[Sql]: ...
    def snapshot(self) -> ContextManager[Sql]: ...
    def write(self, wait: float | None = None) -> ContextManager[Sql]:
        """``wait``: seconds to wait for the database at most (PostgreSQL: a pooled connection)."""

    def created(self) -> bool:
        """Does the gallery exist (made by us or anyone)?"""

    def create(self, meta: dict[str, str]) -> bool:
        """Make the gallery with these meta rows, in one transaction; False if another process made it first."""

    def changed(self) -> bool:
        """Has another connection committed since the last look? (Cheap: called on every read.)"""

    def relocated(self) -> bool:
        """Was the gallery replaced (re-embedded) by another process? Then this now points at the new one."""

    def take_over(self, other: "Database", version: int) -> None:
        """Become ``other`` (a finished scratch gallery, closed), in one step; ``version``: the version
        this gallery must still be at (else ``ChangedMeanwhile``: catch up and try again)."""

    def close(self) -> None: ...


class ChangedMeanwhile(Exception):
    """Another process wrote to a gallery while it was being replaced; catch up and try again."""


class Home(Protocol):
    location: str  # for messages: a directory or a URL without its password

    def names(self) -> list[str]: ...
    def exists(self, name: str) -> bool: ...
    def describe(self, name: str) -> dict | None: ...
    def open(self, name: str) -> Database: ...

    def scratch(self, name: str) -> Database:
        """An empty, unlisted place to build a replacement for gallery ``name`` (leftovers removed)."""

    def discard(self, db: Database) -> None:
        """Remove a scratch place (after its gallery was closed), unless it was taken over."""

    def delete(self, name: str) -> bool:
        """Remove a gallery and everything of it, in one step that survives a crash half-way; False if
        there is none. (Close this process's copy first.)"""

    def follow(self, changed: Callable[[str], None], everything: Callable[[], None]) -> None:
        """Call ``changed(name)`` when another process commits to a gallery, and ``everything()`` when
        notices may have been missed; SQLite needs neither (its reads check the data version)."""
    def close(self) -> None: ...


def is_database_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_home(location: str | Path, wait: float = 30.0) -> Home:
    """A data directory -> SQLite files in it; ``postgresql://...`` -> that database (waiting up to
    ``wait`` seconds for it to be reachable: a database starting beside us)."""
    if is_database_url(location):
        from .postgres import PostgresHome

        return PostgresHome(str(location), wait=wait)
    from .sqlite import SqliteHome

    return SqliteHome(Path(location))
