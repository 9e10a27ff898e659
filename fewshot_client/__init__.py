"""A Python client for the fewshot REST service: ``Client(url, api_key=None)``.

A package of its own (httpx only) so that a client program needs neither torch nor the service:
``from fewshot_client import Client``. The service's JSON errors are raised as ``ServiceError``
subclasses carrying the HTTP status, the error type and its message.
"""
from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote
from typing import Iterable, Union

import httpx

Image = Union[bytes, str, Path]  # image bytes, or the path of an image file


class ServiceError(Exception):
    """An error answer of the service: ``status``, ``kind`` (the error type) and the message."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status, self.kind, self.message = status, kind, message


class BadRequest(ServiceError):
    """400, 413, 415, 422: the request was refused and nothing changed."""


class Unauthorized(ServiceError):
    """401 or 403: a missing, wrong or read-only API key."""


class NotFound(ServiceError):
    """404: no such gallery, class or example."""


class Conflict(ServiceError):
    """409: the class or gallery exists already, or vectors of another encoder."""


class Unavailable(ServiceError):
    """429 or 503: busy or starting; ``retry_after`` says in how many seconds to try again."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None) -> None:
        super().__init__(status, kind, message)
        self.retry_after = retry_after


def _error(response: httpx.Response) -> ServiceError:
    try:
        body = response.json()["error"]
        kind, message = body["type"], body["message"]
    except (ValueError, KeyError, TypeError):
        kind, message = "http_error", response.text[:500]
    status = response.status_code
    if status in (429, 503):
        retry = response.headers.get("retry-after")
        return Unavailable(status, kind, message, float(retry) if retry and retry.isdigit() else None)
    cls = {401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict}.get(status)
    if cls is None:
        cls = BadRequest if 400 <= status < 500 else ServiceError
    return cls(status, kind, message)


def _segment(text: str) -> str:
    """A label as one URL path segment: every reserved character (``/`` too) percent-encoded."""
    return quote(text, safe="")


def _read(image: Image) -> bytes:
    return image if isinstance(image, (bytes, bytearray)) else Path(image).read_bytes()


class Client:
    """``Client("http://127.0.0.1:8000", api_key=...)``; every method returns the service's JSON."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs) -> dict | list:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    @staticmethod
    def _files(images: Iterable[Image]) -> list:
        return [("files", (f"image{i}", _read(image), "application/octet-stream")) for i, image in enumerate(images)]

    # ---------------------------------------------------------------- galleries and classes
    def galleries(self) -> list[dict]:
        return self._call("GET", "/v1/galleries")

    def gallery(self, name: str) -> dict:
        """A gallery's encoder, counts, version, default threshold (and its source) and creation time."""
        return self._call("GET", f"/v1/galleries/{name}")

    def delete_gallery(self, name: str) -> dict:
        return self._call("DELETE", f"/v1/galleries/{name}")

    def create_gallery(self, name: str, encoder: str | None = None) -> dict:
        return self._call("POST", "/v1/galleries", json={"name": name, "encoder": encoder})

    def enroll(self, gallery: str, label: str, *images: Image) -> dict:
        """Enroll ``label`` from one or more images (bytes or paths), or add images to it."""
        return self._call("POST", f"/v1/galleries/{gallery}/classes/{_segment(label)}/examples", files=self._files(images))

    def classes(self, gallery: str, offset: int = 0, limit: int = 100) -> dict:
        return self._call("GET", f"/v1/galleries/{gallery}/classes", params={"offset": offset, "limit": limit})

    def get_class(self, gallery: str, label: str) -> dict:
        return self._call("GET", f"/v1/galleries/{gallery}/classes/{_segment(label)}")

    def rename_class(self, gallery: str, label: str, new_label: str) -> dict:
        return self._call("PATCH", f"/v1/galleries/{gallery}/classes/{_segment(label)}", json={"label": new_label})

    def delete_class(self, gallery: str, label: str) -> dict:
        return self._call("DELETE", f"/v1/galleries/{gallery}/classes/{_segment(label)}")

    def delete_example(self, gallery: str, example_id: int) -> dict:
        return self._call("DELETE", f"/v1/galleries/{gallery}/examples/{example_id}")

    # ---------------------------------------------------------------- queries
    def recognize(self, gallery: str, *images: Image, k: int = 5, head: str = "prototype",
                  threshold: float | None = None, far: float | None = None) -> dict:
        params = {"k": k, "head": head, **({"threshold": threshold} if threshold is not None else {}),
                  **({"far": far} if far is not None else {})}
        return self._call("POST", f"/v1/galleries/{gallery}/recognize", params=params, files=self._files(images))

    def verify(self, gallery: str, image: Image, label: str, threshold: float | None = None) -> dict:
        params = {"label": label, **({"threshold": threshold} if threshold is not None else {})}
        return self._call("POST", f"/v1/galleries/{gallery}/verify", params=params, files=self._files([image]))

    def embed(self, *images: Image, encoder: str | None = None) -> dict:
        """Embeddings as lists of floats (``encoder``: one the server offers; default its default)."""
        body = {"images": [base64.b64encode(_read(image)).decode() for image in images]}
        return self._call("POST", "/v1/embed", params={"encoder": encoder} if encoder else {}, json=body)

    def ready(self) -> dict:
        return self._call("GET", "/readyz")
