"""Galleries in one PostgreSQL database, shared by every replica of the service.

Layout: schema ``fewshot`` holds the registry (``pg_migrations``); each gallery has its own schema
(``fewshot_g<id>``) with the tables of ``schema``, the same as a SQLite gallery file, so ``Gallery``
runs the same SQL on both.

- Writers of one gallery are serialised by a row lock on its ``version`` (``SELECT ... FOR UPDATE``);
  each write also sends ``NOTIFY fewshot_changes``, delivered at COMMIT, which the other processes'
  listeners hear (``pg_listener``).
- Queries never touch the database: memory answers them. Reads of rows (listing, images) and writes
  take a pooled connection (psycopg 3 pool, checked before use); a database that cannot be reached
  raises ``StoreUnavailable`` within ``POOL_WAIT`` seconds (the service answers 503 with Retry-After),
  and the pool reconnects by itself, trying at least every ``RECONNECT_MAX`` seconds, once it is back.
"""
from __future__ import annotations

import logging
import time
import uuid
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..errors import StoreMissing, StoreUnavailable, UnknownGallery
from . import ChangedMeanwhile

try:
    import psycopg
    from psycopg import sql as pgsql
    from psycopg_pool import ConnectionPool
    from psycopg_pool.base import AttemptWithBackoff
except ImportError as error:  # pragma: no cover - the postgres extra is part of dev
    raise StoreMissing("the PostgreSQL store needs psycopg: pip install 'fewshot[postgres]'") from error

from .pg_listener import CHANNEL, Listener  # noqa: E402 - they need psycopg too
from .pg_migrations import create_tables, migrate, use_schema  # noqa: E402

log = logging.getLogger("fewshot.postgres")

POOL_WAIT = 3.0  # seconds a request waits for a connection before StoreUnavailable
CONNECT_TIMEOUT = 3
RECONNECT_MAX = 0.5  # seconds between the pool's reconnection attempts, at most (its default doubles to minutes)
RETIRE_AFTER = 60.0  # seconds a replaced gallery's schema stays for replicas still reading it


@lru_cache(maxsize=256)
def _dialect(statement: str) -> str:
    """Our portable SQL uses ``?``; psycopg binds ``%s``. (No statement of ours holds a literal ? or %.)"""
    return statement.replace("?", "%s")


def _drop_schema(conn, schema: str) -> None:
    conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # psycopg's messages run over several lines


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


class PostgresSql:
    def __init__(self, conn: "psycopg.Connection") -> None:
        self._conn = conn

    def execute(self, statement: str, params: Sequence = ()):
        return self._conn.cursor(binary=True).execute(_dialect(statement), params)

    def executemany(self, statement: str, rows: Iterable[Sequence]) -> None:
        rows = list(rows)
        if rows:
            self._conn.cursor(binary=True).executemany(_dialect(statement), rows)

    def insert_ids(self, statement: str, rows: Sequence[Sequence]) -> list[int]:
        if not rows:
            return []
        cursor = self._conn.cursor(binary=True)
        cursor.executemany(_dialect(statement + " RETURNING id"), rows, returning=True)
        ids = []
        while True:
            ids.append(cursor.fetchone()[0])
            if not cursor.nextset():
                return ids

    def ids_taken(self) -> None:
        self.execute("SELECT setval(pg_get_serial_sequence('examples', 'id'), "
                     "(SELECT COALESCE(MAX(id), 0) + 1 FROM examples), false)")


class PostgresDatabase:
    """One gallery's schema, reached through the home's pool."""

    kind = "postgresql"
    folder = None  # nothing on local disk: every replica builds its index from the database

    def __init__(self, home: "PostgresHome", name: str, schema: str | None) -> None:
        self.home, self.name, self.schema = home, name, schema

    def _in_schema(self, conn, local: bool) -> None:
        use_schema(conn, self.schema or "fewshot_none", local)

    @contextmanager
    def read(self) -> Iterator[PostgresSql]:
        with self.home.connection() as conn:
            self._in_schema(conn, local=False)
            yield PostgresSql(conn)

    @contextmanager
    def snapshot(self) -> Iterator[PostgresSql]:
        with self.home.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._in_schema(conn, local=True)
            yield PostgresSql(conn)

    @contextmanager
    def write(self, wait: float | None = None) -> Iterator[PostgresSql]:
        with self.home.connection(wait) as conn, conn.transaction():
            self._in_schema(conn, local=True)
            conn.execute("SELECT value FROM meta WHERE key = 'version' FOR UPDATE")  # one writer per gallery
            if self.home.schema_of(self.name, conn) != self.schema:  # re-embedded meanwhile: not here any more
                raise StoreUnavailable(f"gallery {self.name!r} was just replaced (re-embedded); retry in a moment")
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.home.token}:{self.name}"))  # sent at COMMIT
            yield PostgresSql(conn)

    def create(self, meta: dict[str, str]) -> bool:
        with self.home.connection() as conn, conn.transaction():
            row = conn.execute("INSERT INTO fewshot.galleries (name, created) VALUES (%s, %s) "
                               "ON CONFLICT (name) DO NOTHING RETURNING id", (self.name, time.time())).fetchone()
            if row is None:  # another process made it (its transaction has committed: we waited on its row)
                self.schema = self.home.schema_of(self.name, conn)
                return False
            self.schema = f"fewshot_g{row[0]}"
            conn.execute(pgsql.SQL("CREATE SCHEMA {}").format(pgsql.Identifier(self.schema)))
            conn.execute("UPDATE fewshot.galleries SET schema = %s WHERE id = %s", (self.schema, row[0]))
            self._in_schema(conn, local=True)
            rows = {**meta, "schema_version": str(create_tables(conn))}
            conn.cursor().executemany("INSERT INTO meta (key, value) VALUES (%s, %s)", list(rows.items()))
        return True

    def created(self) -> bool:
        if self.schema is None:
            self.schema = self.home.schema_of(self.name)
        return self.schema is not None

    def changed(self) -> bool:
        return False  # the home's listener announces changes; reads never wait on the database

    def relocated(self) -> bool:
        schema = self.home.schema_of(self.name)
        if schema is None:
            raise UnknownGallery(f"gallery {self.name!r} was deleted")
        if schema == self.schema:
            return False
        self.schema = schema
        return True

    def take_over(self, other: "PostgresDatabase", version: int) -> None:
        """Point this gallery's name at ``other``'s schema, in one transaction that holds this gallery's
        write lock: writers elsewhere either committed before (then ``ChangedMeanwhile``) or find the
        name moved. The old schema is dropped ``RETIRE_AFTER`` seconds later (replicas may still read it)."""
        with self.home.connection() as conn, conn.transaction():
            self._in_schema(conn, local=True)
            stored = int(conn.execute("SELECT value FROM meta WHERE key = 'version' FOR UPDATE").fetchone()[0])
            if stored != version:
                raise ChangedMeanwhile(f"gallery {self.name!r} is at version {stored}, not {version}")
            conn.execute("DELETE FROM fewshot.galleries WHERE name = %s", (other.name,))
            conn.execute("UPDATE fewshot.galleries SET schema = %s WHERE name = %s", (other.schema, self.name))
            conn.execute("INSERT INTO fewshot.retired VALUES (%s, %s)", (self.schema, time.time()))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.home.token}:{self.name}"))
        self.schema = other.schema
        other.schema = None
    def close(self) -> None:
        pass  # the pool belongs to the home


class _Attempt(AttemptWithBackoff):
    """The pool's reconnection schedule, capped: a database back after an outage is used within a second."""

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_MAX)


class _Pool(ConnectionPool):
    def _add_connection(self, attempt=None, growing: bool = False) -> None:
        super()._add_connection(attempt or _Attempt(timeout=self.reconnect_timeout), growing)


class PostgresHome:
    """Every gallery in one database. Connects, migrates, and starts listening on ``follow``."""

    def __init__(self, url: str, pool_size: int = 16, wait: float = 30.0) -> None:
        self.url, self.location = url, redact(url)
        self.token = uuid.uuid4().hex[:12]  # marks this process's own notices, which it need not apply
        self.pool = _Pool(url, min_size=1, max_size=pool_size, open=False, timeout=POOL_WAIT,
                                   kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                                   check=ConnectionPool.check_connection, name="fewshot")
        self._listener: Listener | None = None
        deadline = time.monotonic() + wait
        while True:  # a database starting beside us (docker compose) gets `wait` seconds
            try:
                psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT).close()
                break
            except psycopg.OperationalError as error:
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"cannot reach the gallery database {self.location}: "
                                           f"{_one_line(error)[:300]}. Check that PostgreSQL is running and the "
                                           "URL (user, password, host, port, database) is right") from None
                log.info("waiting for the gallery database %s", self.location)
                time.sleep(0.5)
        self.pool.open(wait=True, timeout=POOL_WAIT * 2)
        try:
            self.migrate()
            self.sweep_scratch()
        except BaseException:
            self.pool.close()
            raise

    @contextmanager
    def connection(self, wait: float | None = None) -> Iterator["psycopg.Connection"]:
        """A pooled connection (waiting ``wait`` s for one at most, default POOL_WAIT); a database that
        cannot be reached becomes StoreUnavailable."""
        try:
            with self.pool.connection(timeout=POOL_WAIT if wait is None else wait) as conn:
                yield conn
        except psycopg.OperationalError as error:
            raise StoreUnavailable(f"the gallery database is unavailable ({_one_line(error)[:200]}); nothing "
                                   "was changed, retry in a moment") from error

    def migrate(self) -> None:
        """Bring the registry and every gallery schema to the newest migration (idempotent)."""
        with self.connection() as conn, conn.transaction():
            migrate(conn)

    def schema_of(self, name: str, conn=None) -> str | None:
        if conn is None:
            with self.connection() as conn:
                return self.schema_of(name, conn)
        row = conn.execute("SELECT schema FROM fewshot.galleries WHERE name = %s", (name,)).fetchone()
        return row[0] if row else None

    def names(self) -> list[str]:
        with self.connection() as conn:
            return sorted(r[0] for r in conn.execute("SELECT name FROM fewshot.galleries WHERE schema IS NOT NULL "
                                                     "AND name NOT LIKE '.%'"))  # scratch galleries are hidden

    def exists(self, name: str) -> bool:
        return self.schema_of(name) is not None

    def describe(self, name: str) -> dict | None:
        with self.connection() as conn, conn.transaction():
            schema = self.schema_of(name, conn)
            if schema is None:
                return None
            use_schema(conn, schema)
            return dict(conn.execute("SELECT key, value FROM meta").fetchall())

    def open(self, name: str) -> PostgresDatabase:
        return PostgresDatabase(self, name, self.schema_of(name))

    def scratch(self, name: str) -> PostgresDatabase:
        hidden = f".{name}.reembed"  # not a gallery name: never listed
        self.discard(PostgresDatabase(self, hidden, self.schema_of(hidden)))
        db = PostgresDatabase(self, hidden, None)
        # while this process builds it, a session lock says so (it dies with the process's connection)
        db.hold = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        db.hold.execute("SELECT pg_advisory_lock(hashtext(%s))", (hidden,))
        return db

    def discard(self, db: PostgresDatabase) -> None:
        try:
            if db.schema is not None:
                with self.connection() as conn, conn.transaction():
                    conn.execute("DELETE FROM fewshot.galleries WHERE name = %s AND schema = %s", (db.name, db.schema))
                    _drop_schema(conn, db.schema)
                db.schema = None
        finally:
            hold = getattr(db, "hold", None)
            if hold is not None:
                hold.close()

    def sweep_scratch(self) -> None:
        """Drop the scratch galleries of re-embeddings that stopped (no process holds their lock)."""
        with self.connection() as conn:
            hidden = conn.execute("SELECT name, schema FROM fewshot.galleries WHERE name LIKE '.%%.reembed'").fetchall()
            for name, schema in hidden:
                if conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (name,)).fetchone()[0]:
                    try:
                        with conn.transaction():
                            conn.execute("DELETE FROM fewshot.galleries WHERE name = %s", (name,))
                            if schema is not None:
                                _drop_schema(conn, schema)
                    finally:
                        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))

    def delete(self, name: str) -> bool:
        """Remove gallery ``name`` (its schema: vectors, images, change log) in one transaction; the other
        replicas hear of it and close their copy. False if there is no such gallery."""
        with self.connection() as conn, conn.transaction():
            row = conn.execute("DELETE FROM fewshot.galleries WHERE name = %s RETURNING schema", (name,)).fetchone()
            if row is None:
                return False
            if row[0] is not None:
                _drop_schema(conn, row[0])
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.token}:{name}"))
        return True

    def sweep(self) -> None:
        """Drop the schemas of galleries replaced more than RETIRE_AFTER seconds ago."""
        with self.connection() as conn, conn.transaction():
            rows = conn.execute("DELETE FROM fewshot.retired WHERE since < %s RETURNING schema",
                                (time.time() - RETIRE_AFTER,)).fetchall()
            for (schema,) in rows:
                _drop_schema(conn, schema)

    def follow(self, changed: Callable[[str], None], everything: Callable[[], None]) -> None:
        if self._listener is None:
            self._listener = Listener(self.url, self.location, self.token, CONNECT_TIMEOUT, changed, everything,
                                      self.sweep)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self.pool.close()
