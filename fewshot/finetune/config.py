"""What a fine-tuning run is told (``FinetuneConfig``) and what it reports (``FinetuneReport``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


MAX_CACHE_FRACTION = 0.5  # of physical memory


PHASE_ONE_VIEWS = 8  # cached views (all four turns, twice) pooled for the head's phase


@dataclass
class FinetuneConfig:
    encoder: str = "efficientnet_lite0"
    unfreeze: int | str = 6  # top units trained in phase 2, or "all"
    method: str = "protonet"  # "protonet" (episodic) or "cosine" (Baseline++ over the base classes)
    epochs: int = 20
    lr: float = 1e-3  # for the head and the topmost unit; each unit below gets LAYER_DECAY times less
    layer_decay: float = 0.8
    image_size: int | None = None  # None: the encoder's own input size
    val_classes: float = 0.1  # fraction of classes held out (half stop early, half judge)
    views: int = 3  # cached views per image: the image itself and views-1 augmented copies
    augment: str = "auto"  # auto | shapes | photos | none
    rotate_classes: bool = False  # each class turned by 90/180/270 degrees is a new class (glyphs, symbols)
    ways: int = 60  # classes per training episode (Prototypical Networks trained 60-way on Omniglot)
    batchnorm: str = "train"  # "train": batch statistics; "frozen": recalibrated on the data once, then fixed
    shots: int = 1
    queries: int = 5
    batch_size: int = 128  # the cosine method's batch
    patience: int = 4
    max_minutes: float | None = None
    keep_anyway: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FinetuneReport:
    kept: bool
    reason: str
    out: str
    frozen: dict = field(default_factory=dict)  # episode report of the base encoder on the judging classes
    finetuned: dict = field(default_factory=dict)
    difference: float = 0.0  # fine-tuned minus frozen accuracy, percent, paired over the same episodes
    difference_ci95: float = 0.0
    unfrozen_units: int = 0
    total_units: int = 0
    train_classes: int = 0
    stop_classes: int = 0
    judge_classes: int = 0
    images: int = 0
    unreadable: int = 0
    epochs: int = 0
    stopped: str = ""  # "early stopping", "epochs", "time budget", "interrupted"
    best_validation: float = 0.0
    history: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
