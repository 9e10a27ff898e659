"""The encoders one server runs: each loaded once, on first use, with its own micro-batcher.

``FEWSHOT_ENCODERS`` lists the encoders galleries may choose (default ``efficientnet_lite0,face,face:cnn``);
``FEWSHOT_ENCODER`` is the one a gallery gets when it is created by its first enrollment, and the
one loaded at start. Every gallery records its encoder; a route asks the pool for that encoder's
``Slot``: the encoder, its batcher and its image pipeline.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from fewshot.backbones import canonical_name
from fewshot.batching import MicroBatcher
from fewshot.encoders import Encoder, create_encoder, main_instance
from fewshot.errors import FaceChoice, InvalidArgument, InvalidImage, NoFace
from fewshot.images import KeptImage
from fewshot.images import Instance, decode_image, media_type, thumbnail, upload_size
from fewshot.reference import ReferencePoint, load_reference

from .config import Settings
from .metrics import Metrics


CPU_BATCH, CUDA_BATCH = 16, 128  # FEWSHOT_MAX_BATCH_SIZE=0 (the default): the batch size by device


class Embedder:
    """Images -> instances (decoded and located in the worker pool) -> unit rows from the batcher."""

    def __init__(self, encoder: Encoder, decoders: Executor, batcher: MicroBatcher) -> None:
        self.encoder, self.decoders, self.batcher = encoder, decoders, batcher

    def _locate(self, data: bytes, keep: str) -> tuple[list[Instance], KeptImage | None]:
        """In a decode thread: decode once, find the instances, and make what the gallery keeps."""
        image = decode_image(data, self.encoder.max_bytes, self.encoder.max_pixels,
                             getattr(self.encoder, "at_least", None))  # a big JPEG at reduced scale
        found = self.encoder.instances(image)
        size = upload_size(image)
        if keep == "none":
            return found, None, size
        original = keep == "original"
        return (found, KeptImage(thumbnail(image), data if original else None, media_type(data) if original else None),
                size)

    async def locate(self, images: list[bytes], keep: str = "none") -> list[tuple]:
        """Per image, what the encoder embeds in it (the whole image, or every face, largest first), what to
        keep of it (``keep``: original, thumbnail or none) and its (width, height) as uploaded."""
        loop = asyncio.get_running_loop()
        found = await asyncio.gather(*(loop.run_in_executor(self.decoders, self._locate, data, keep)
                                       for data in images), return_exceptions=True)
        for i, result in enumerate(found):
            if isinstance(result, InvalidImage):
                raise type(result)(f"image {i + 1}: {result}")
            if isinstance(result, BaseException):
                raise result
        return found

    async def instances_of(self, images: list[bytes]) -> list[list[Instance]]:
        return [found for found, _, _ in await self.locate(images)]

    async def rows(self, pixels: list[np.ndarray]) -> np.ndarray:
        if not pixels:
            return np.zeros((0, self.encoder.dim), np.float32)
        return np.stack(await asyncio.gather(*(self.batcher.submit(p) for p in pixels)))

    async def main_rows(self, images: list[bytes], keep: str = "none",
                        choose=None) -> tuple[np.ndarray, list[int], list[KeptImage | None], list[Instance]]:
        """One row per image, of its main instance, with how many instances each image had, what to keep of
        each and the instances embedded. The main instance: ``choose(faces, size)`` in face galleries where
        given (enrollment: ``face_quality.choose``), else ``main_instance``'s face. An image with no face (or none
        to choose) raises naming it, before anything is embedded."""
        located = await self.locate(images, keep)
        chosen = []
        for i, (instances, _, size) in enumerate(located):
            try:
                if choose is not None and self.encoder.finds_faces:
                    chosen.append(choose(instances, size))
                else:
                    chosen.append(main_instance(instances, self.encoder.finds_faces, size))
            except FaceChoice as exc:
                raise exc.naming(f"image {i + 1}") from None
            except NoFace as exc:
                raise NoFace(f"image {i + 1}: {exc}") from None
        rows = await self.rows([instance.pixels for instance in chosen])
        return rows, [len(found) for found, _, _ in located], [kept for _, kept, _ in located], chosen


@dataclass
class Slot:
    name: str
    encoder: Encoder
    batcher: MicroBatcher
    embedder: Embedder
    reference: ReferencePoint | None


class EncoderPool:
    def __init__(self, settings: Settings, decoders: Executor, metrics: Metrics,
                 given: dict[str, Encoder] | None = None) -> None:
        self.settings, self.decoders, self.metrics, self.given = settings, decoders, metrics, given or {}
        self.default = settings.encoder if not given else next(iter(given))
        self.allowed = self.offered(settings, given)
        self.slots: dict[str, Slot] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def offered(settings: Settings, given: dict | None = None) -> list[str]:
        """The encoders galleries may choose: the default first, then FEWSHOT_ENCODERS."""
        default = settings.encoder if not given else next(iter(given))
        names = [n.strip() for n in settings.encoders.split(",") if n.strip()]
        return list(dict.fromkeys([default, *(given or {}), *names]))

    def check(self, name: str | None) -> str:
        """The encoder a request or a gallery names (or the default), if this server offers it, by the name
        it is offered under (``face:detect`` is served by the ``face`` this server offers)."""
        name = self.default if name is None else name
        offered = {canonical_name(a): a for a in reversed(self.allowed)}
        if (found := offered.get(canonical_name(name))) is not None:
            return found
        raise InvalidArgument(f"encoder {name!r} is not offered by this server; choose one of {self.allowed} "
                              "(FEWSHOT_ENCODERS)")

    async def get(self, name: str | None = None) -> Slot:
        name = self.check(name)
        if name in self.slots:
            return self.slots[name]
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self.slots:
                self.slots[name] = await self._load(name)
        return self.slots[name]

    async def _load(self, name: str) -> Slot:
        s = self.settings
        encoder = self.given.get(name) or await asyncio.to_thread(
            create_encoder, name, s.device, s.runtime, s.cache_dir, threads=s.threads, max_bytes=s.max_image_bytes,
            max_pixels=s.max_image_pixels, calibration=s.calibration)
        on_gpu = str(getattr(getattr(encoder, "runtime", None), "device", "cpu")).startswith("cuda")
        batch = s.max_batch_size or (CUDA_BATCH if on_gpu else CPU_BATCH)
        batcher = MicroBatcher(encoder.embed, batch, s.max_wait_ms, s.max_queue,
                               on_batch=self.metrics.batch)
        await batcher.start()
        await asyncio.to_thread(encoder.embed, np.zeros((1, *encoder.input_shape), np.uint8))  # warm
        return Slot(name, encoder, batcher, Embedder(encoder, self.decoders, batcher),
                    load_reference(name, encoder.fingerprint))

    @property
    def depth(self) -> int:
        return sum(slot.batcher.depth for slot in self.slots.values())

    async def stop(self) -> None:
        for slot in self.slots.values():
            await slot.batcher.stop()
