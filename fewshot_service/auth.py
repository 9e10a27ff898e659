"""API keys: with any key configured, queries need the read-only key or the admin key, and writes
the admin key. Keys come as ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time."""
from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request

from .config import Settings


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def _presented_key(request: Request) -> str | None:
    if key := request.headers.get("x-api-key"):
        return key
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def _allowed(presented: str | None, *keys: str | None) -> bool:
    wanted = [k for k in keys if k]
    if not wanted:
        return True
    return presented is not None and any(hmac.compare_digest(presented.encode(), k.encode()) for k in wanted)


def require_read(request: Request, config: Settings = Depends(settings_of)) -> None:
    """With any key configured, queries need the read-only key or the admin key."""
    if not _allowed(_presented_key(request), config.read_key, config.admin_key):
        raise HTTPException(401, "missing or wrong API key: send X-API-Key or Authorization: Bearer")


def require_admin(request: Request, config: Settings = Depends(settings_of)) -> None:
    """Writes need the admin key whenever any key is configured (Settings refuses a read key alone)."""
    if (config.admin_key or config.read_key) and not _allowed(_presented_key(request), config.admin_key):
        raise HTTPException(401 if not _presented_key(request) else 403,
                            "this call changes data: it needs the admin API key")


Read = Depends(require_read)
Admin = Depends(require_admin)
