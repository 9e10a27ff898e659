"""Following other replicas on PostgreSQL: one thread per process with its own connection
(``LISTEN``) hears which gallery another process committed to and lets the store's open copy follow
its change log. After any disconnection, and every ``CHECK_EVERY`` seconds, every open gallery is
checked: nothing missed stays missed. It says once per outage that it lost the database, and when it
follows again."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import psycopg
from psycopg import sql as pgsql

from ..errors import StoreUnavailable

log = logging.getLogger("fewshot.postgres")

CHANNEL = "fewshot_changes"
CHECK_EVERY = 5.0  # seconds between version checks of every open gallery (missed notices)
RETRY_MAX = 1.0  # seconds between reconnection attempts, at most


class Listener:
    def __init__(self, url: str, location: str, token: str, connect_timeout: float,
                 changed: Callable[[str], None], everything: Callable[[], None], every: Callable[[], None]) -> None:
        """``changed(name)`` on another process's notice, ``everything()`` after (re)connecting and
        every CHECK_EVERY seconds, with ``every()`` (housekeeping) beside it."""
        self.url, self.location, self.token, self.connect_timeout = url, location, token, connect_timeout
        self._changed, self._everything, self._every = changed, everything, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fewshot-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pause, lost = 0.2, False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout) as conn:
                    conn.execute(pgsql.SQL("LISTEN {}").format(pgsql.Identifier(CHANNEL)))
                    self._everything()  # whatever was committed while we were not listening
                    if lost:
                        log.warning("following the gallery database %s again", self.location)
                    pause, lost = 0.2, False
                    self._listen(conn)
            except (psycopg.Error, StoreUnavailable) as error:
                if not self._stop.is_set():  # said once per outage; the retries are quiet
                    log.log(logging.DEBUG if lost else logging.WARNING, "lost the gallery database %s (%s); "
                            "retrying every second", self.location, " ".join(str(error).split())[:200])
                    lost = True
            except Exception:  # a bug applying a change must not end following for good
                log.exception("following the gallery database failed; retrying")
            self._stop.wait(pause)
            pause = min(pause * 2, RETRY_MAX)

    def _listen(self, conn) -> None:
        checked = time.monotonic()
        while not self._stop.is_set():
            for notice in conn.notifies(timeout=0.5):
                token, _, name = notice.payload.partition(":")
                if token != self.token:
                    self._changed(name)
            if time.monotonic() - checked >= CHECK_EVERY:
                self._everything()
                self._every()
                checked = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
