"""The fine-tuned encoder's checkpoint: ``OUT/model.safetensors`` (the whole network) and
``OUT/finetune.json`` (base spec, preprocessing, head, report). The writer (``fewshot.finetune``) and
the reader (``fewshot.backbones``, spec ``finetuned:OUT``) both import this module and not each other.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import UnknownEncoder
from .files import replaced_atomically, write_atomic
from .images import Preprocessing

META_FILE, WEIGHTS_FILE = "finetune.json", "model.safetensors"
FORMAT_VERSION = 1


def split_units(trunk) -> tuple[list, object]:
    """A headless timm trunk -> (units in forward order, global pool). Raises ``UnknownEncoder``."""
    import torch.nn as nn

    names = set(dict(trunk.named_children()))
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"} <= names:  # EfficientNet family
        units = [nn.Sequential(trunk.conv_stem, trunk.bn1)] + [b for stage in trunk.blocks for b in stage]
        return units + [nn.Sequential(trunk.conv_head, trunk.bn2)], trunk.global_pool
    if {"conv1", "bn1", "act1", "maxpool", "layer1", "layer4", "global_pool"} <= names:  # ResNet family
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.act1, trunk.maxpool)
        layers = [getattr(trunk, f"layer{i}") for i in range(1, 5)]
        return [stem] + [b for layer in layers for b in layer], trunk.global_pool
    raise UnknownEncoder(f"fine-tuning supports timm EfficientNet and ResNet style encoders; "
                         f"{type(trunk).__name__} is neither")


def build_network(trunk, head_dim: int | None):
    """The fine-tunable network: units -> global pool -> optional linear head (identity at start)."""
    import torch
    import torch.nn as nn

    class FinetunedNetwork(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            units, pool = split_units(trunk)
            self.body = nn.Sequential(*units)
            self.pool = pool
            self.head = nn.Identity()
            if head_dim:
                self.head = nn.Linear(head_dim, head_dim)
                with torch.no_grad():
                    self.head.weight.copy_(torch.eye(head_dim))
                    self.head.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.pool(self.body(x)).flatten(1))

    return FinetunedNetwork()


def load_finetuned(folder: str | Path, untrained_trunk: Callable[[str], object]):
    """(network, preprocessing, meta) of a ``fewshot finetune`` output; ``untrained_trunk(spec)`` makes
    the base encoder's network without weights (``backbones.untrained_trunk``). Raises ``UnknownEncoder``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_meta(folder)
    if meta.get("format") != FORMAT_VERSION:
        raise UnknownEncoder(f"{folder / META_FILE} has format {meta.get('format')!r}; this fewshot reads "
                             f"format {FORMAT_VERSION}: fine-tune again with this version")
    trunk = untrained_trunk(meta["base"]["spec"])
    network = build_network(trunk, meta["head_dim"])
    state = load_file(folder / WEIGHTS_FILE)
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UnknownEncoder(f"{folder / WEIGHTS_FILE} does not match {meta['base']['spec']} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return network.eval(), Preprocessing.from_dict(meta["preprocessing"]), meta


def read_meta(folder: Path) -> dict:
    meta_file, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_file.is_file() or not weights.is_file():
        raise UnknownEncoder(f"{folder} is not a fine-tuned encoder (it needs {META_FILE} and {WEIGHTS_FILE}); "
                             f"make one with: fewshot finetune DATA {folder}")
    meta = json.loads(meta_file.read_text())
    if not meta.get("kept"):
        report = meta.get("report", {})
        raise UnknownEncoder(
            f"{folder} holds a fine-tuned encoder that was not kept: {report.get('reason', 'training did not finish')}. "
            "Fine-tune again (other settings or more data), or pass --keep-anyway to use it regardless")
    return meta


def save_finetuned(out: Path, network, prep, head_dim: int, base, cfg, report) -> None:
    """Write ``out``: the network's weights (safetensors, never pickle) and ``finetune.json``, each atomically."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    with replaced_atomically(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    meta = {"format": FORMAT_VERSION, "kept": report.kept, "head_dim": head_dim,
            "base": {"spec": base.spec, "fingerprint": base.fingerprint},
            "preprocessing": prep.to_dict(), "config": cfg.to_dict(), "report": report.to_dict()}
    write_atomic(out / META_FILE, json.dumps(meta, indent=1))
