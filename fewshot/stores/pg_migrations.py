"""The PostgreSQL store's schema versions: the registry in schema ``fewshot`` (``migrations``: which
ran; ``galleries``: name -> schema; ``retired``: replaced schemas waiting to be dropped), and every
gallery schema brought to the shared gallery layout (``schema``). Run by the service itself under an
advisory lock, so replicas starting together do it once; no manual SQL."""
from __future__ import annotations

import logging
import time

from .schema import LATEST, statements

log = logging.getLogger("fewshot.postgres")

MIGRATION_LOCK = 0x66657773686F74  # pg_advisory_xact_lock key: "fewshot"

# Versioned migrations of the registry, applied in order, each exactly once. Never edit one that has
# shipped: add the next.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "gallery registry", [
        "CREATE TABLE fewshot.galleries (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
        "name TEXT NOT NULL UNIQUE, schema TEXT UNIQUE, created DOUBLE PRECISION NOT NULL)",
    ]),
    (2, "schemas of replaced galleries, dropped a while later", [
        "CREATE TABLE fewshot.retired (schema TEXT PRIMARY KEY, since DOUBLE PRECISION NOT NULL)",
    ]),
]


def use_schema(conn, schema: str, local: bool = True) -> None:
    """Statements on ``conn`` name this gallery's tables (for its transaction only, when ``local``)."""
    conn.execute("SELECT set_config('search_path', %s, %s)", (schema, local))  # bound: a value, not SQL


def create_tables(conn) -> int:
    """In the current schema (a new gallery's): every gallery migration; returns the version reached."""
    for _, _, listed in statements("postgresql", 0):
        for statement in listed:
            conn.execute(statement)
    return LATEST


def migrate(conn) -> None:
    """Inside a transaction: the registry and every gallery schema to the newest migration (idempotent)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    conn.execute("CREATE SCHEMA IF NOT EXISTS fewshot")
    conn.execute("CREATE TABLE IF NOT EXISTS fewshot.migrations (version INTEGER PRIMARY KEY, "
                 "what TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)")
    done = conn.execute("SELECT COALESCE(MAX(version), 0) FROM fewshot.migrations").fetchone()[0]
    for version, what, listed in MIGRATIONS:
        if version > done:
            for statement in listed:
                conn.execute(statement)
            conn.execute("INSERT INTO fewshot.migrations VALUES (%s, %s, %s)", (version, what, time.time()))
            log.info("migrated the gallery registry to version %d (%s)", version, what)
    for (schema,) in conn.execute("SELECT schema FROM fewshot.galleries WHERE schema IS NOT NULL").fetchall():
        use_schema(conn, schema)
        at = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        for version, what, listed in statements("postgresql", at):
            for statement in listed:
                conn.execute(statement)
            conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(version),))
            log.info("migrated gallery schema %s to version %d (%s)", schema, version, what)
