"""Domain fine-tuning: a new head on frozen features, then the encoder's top units, guarded.

The encoder is cut into *units* (the stem, each residual block, the final conv): the lower ones
stay frozen, so their outputs for every training image (and a few augmented views of it) are
computed once and cached; each epoch then runs only the top ``unfreeze`` units. Phase 1 trains a
head on the frozen top's pooled features; phase 2 trains the top units (smaller learning rates the
deeper a unit sits) and the head, with early stopping on few-shot episodes over held-out classes.
The run ends by comparing the frozen base encoder and the fine-tuned one on *other* held-out
classes (the negative-transfer guard, ``fewshot.evaluate.guard``): ``kept`` only when fine-tuning
helped, or when forced.

The output folder holds ``model.safetensors`` (the whole network, never pickle) and
``finetune.json`` (base encoder, its fingerprint, preprocessing, report), written by
``fewshot.checkpoint``; the encoder spec ``finetuned:OUT`` loads it on either runtime.

Modules: ``config`` (what a run is told and reports), ``views`` (split, decode, augment),
``cache`` (the frozen-feature cache), ``training`` (the two phases), ``run`` (``finetune()``).
"""
from .config import FinetuneConfig, FinetuneReport
from .run import finetune

__all__ = ["FinetuneConfig", "FinetuneReport", "finetune"]
