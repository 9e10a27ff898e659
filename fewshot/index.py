"""The derived vector index of a gallery: FAISS, cosine over unit rows, removable ids.

``exact``: a flat fp32 index. Batches go through BLAS; a lone query over a large gallery is
memory-bound (100,000 x 1280 floats = 512 MB per scan), so it first scans an fp16 copy (half the
bytes) for ``k + 32`` candidates, then re-scores those in fp32: the same answer as the fp32 scan
except among candidates tied within fp16 rounding (~1e-3).
``hnsw``: approximate, sub-millisecond on large galleries; a removal rebuilds it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import replaced_atomically

KINDS = ("exact", "hnsw")
HNSW_M, HNSW_EF_SEARCH = 32, 128
# faiss-cpu ships distance_compute_blas_threshold = 128000 queries, so every realistic batch takes
# the scalar path: 5.7x slower than BLAS for 64 queries here. BLAS wins from a handful of queries.
FAISS_BLAS_THRESHOLD = 4
PRESCAN_FROM = 20_000  # below this a full fp32 scan takes a few ms: no pre-scan needed
PRESCAN_MAX_QUERIES = 4  # more queries at once: BLAS over fp32 is faster
PRESCAN_MARGIN = 32


class VectorIndex:
    def __init__(self, dim: int, kind: str = "exact") -> None:
        import faiss

        if kind not in KINDS:
            raise ValueError(f"unknown index {kind!r}; choose one of {list(KINDS)}")
        faiss.cvar.distance_compute_blas_threshold = FAISS_BLAS_THRESHOLD
        self.dim, self.kind = dim, kind
        self.main = self._new_main()
        self.prescan = self._new_prescan() if kind == "exact" else None

    def _new_main(self):
        import faiss

        if self.kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 80, HNSW_EF_SEARCH
            return faiss.IndexIDMap2(hnsw)
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _new_prescan(self):
        import faiss

        fp16 = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIDMap2(fp16)

    def __len__(self) -> int:
        return self.main.ntotal

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self.main.add_with_ids(vectors, ids)
        if self.prescan is not None:
            self.prescan.add_with_ids(vectors, ids)

    def remove(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == "exact":
            self.main.remove_ids(ids)
            self.prescan.remove_ids(ids)
            return
        vectors, kept = self.all_vectors()
        keep = np.isin(kept, ids, invert=True)
        self.main = self._new_main()
        self.main.add_with_ids(vectors[keep], kept[keep])

    def vectors_of(self, ids) -> np.ndarray:
        """The stored vectors of ``ids`` (each must be in the index), (len(ids), dim)."""
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self.main.reconstruct(int(i)) for i in ids]).astype(np.float32)

    def all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (n, dim) float32, ids (n,)) in index order."""
        import faiss

        ids = faiss.vector_to_array(self.main.id_map).astype(np.int64)
        inner = faiss.downcast_index(self.main.index)
        storage = faiss.downcast_index(inner.storage) if self.kind == "hnsw" else inner
        flat = faiss.vector_to_array(storage.codes).view(np.float32).reshape(len(ids), self.dim)
        return flat.copy(), ids

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) unit rows -> (scores, ids), each (n, min(k, len))."""
        k = min(k, len(self))
        if self.prescan is None or len(self) < PRESCAN_FROM or len(queries) > PRESCAN_MAX_QUERIES:
            return self.main.search(queries, k)
        _, candidates = self.prescan.search(queries, min(len(self), k + PRESCAN_MARGIN))
        scores, ids = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
        for row, (query, found) in enumerate(zip(queries, candidates)):
            found = found[found >= 0]
            exact = np.stack([self.main.reconstruct(int(i)) for i in found]) @ query
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row], ids[row] = exact[best], found[best]
        return scores, ids

    def save(self, path: Path) -> None:
        """``path`` (and ``path`` + ``.fp16`` for the pre-scan copy), each replaced atomically."""
        for index, target in [(self.main, path), (self.prescan, _prescan_path(path))]:
            if index is not None:
                _write_index(index, target)

    @classmethod
    def load(cls, path: Path, dim: int, kind: str) -> "VectorIndex":
        import faiss

        index = cls(dim, kind)
        index.main = faiss.read_index(str(path))
        if index.prescan is not None:
            fp16 = _prescan_path(path)
            if fp16.is_file():
                index.prescan = faiss.read_index(str(fp16))
            if index.prescan.ntotal != index.main.ntotal:  # missing or from another moment: rebuild
                index.prescan = index._new_prescan()
                vectors, ids = index.all_vectors()
                index.prescan.add_with_ids(vectors, ids)
        return index


def _prescan_path(path: Path) -> Path:
    return path.with_name(path.name + ".fp16")


def _write_index(index, path: Path) -> None:
    import faiss

    with replaced_atomically(path) as tmp:
        faiss.write_index(index, str(tmp))
