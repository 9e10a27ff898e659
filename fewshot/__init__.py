"""fewshot: learn a new visual class from one or a few example images."""
from .backbones import ENCODERS
from .embed import EmbedReport, embed_dataset
from .embedded import iter_embedded, load_embedded
from .encoders import DEFAULT_ENCODER, Encoder, create_encoder
from .errors import (DimensionMismatch, FewShotError, ImageTooLarge, InvalidImage, InvalidSource,
                     OutputConflict, UnknownEncoder, WeightsNotFound)
from .finetune import FinetuneConfig, FinetuneReport, finetune
from .gallery import Gallery
from .gallery_store import GalleryStore
from .images import Preprocessing, decode_image

__all__ = [
    "DEFAULT_ENCODER", "ENCODERS", "DimensionMismatch", "EmbedReport", "Encoder", "FewShotError",
    "FinetuneConfig", "FinetuneReport", "Gallery",
    "GalleryStore", "ImageTooLarge", "InvalidImage", "InvalidSource", "OutputConflict", "Preprocessing",
    "UnknownEncoder", "WeightsNotFound", "create_encoder", "decode_image", "embed_dataset", "finetune",
    "iter_embedded", "load_embedded",
]
