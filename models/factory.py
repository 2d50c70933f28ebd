"""A model on disk is a folder: ``config.json`` + ``model.safetensors`` (heads only; backbones come from
their packages or ``from_pretrained``). Nothing is unpickled on load. Identity: :mod:`models.identity`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import CompanionConfig, ModelConfig
from .identity import CONFIG_FILE, WEIGHTS_FILE, legacy_fingerprint, model_fingerprint
from .model import AlignModel, resolve_device
from .reference import load_reference

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "combine_models", "create_model", "load_model", "model_fingerprint",
           "save_model"]
CALIBRATION_FILE = "calibration.json"  # measured on the model, not part of it: outside the fingerprint
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_MODEL = "default"


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """A folder path, or the name of a model shipped in ``models/pretrained`` (``default`` when None)."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name)
    if path.is_dir():
        return path
    shipped = PRETRAINED_DIR / name
    if shipped.is_dir():
        return shipped
    available = sorted(p.name for p in PRETRAINED_DIR.iterdir() if p.is_dir()) if PRETRAINED_DIR.is_dir() else []
    raise FileNotFoundError(f"no model folder {name!r} (and no shipped model of that name; shipped: {available})")


def shipped_model_named_by(fingerprint: str) -> str | None:
    """The name of the shipped model whose fingerprint is ``fingerprint`` (an index built with it names it in
    its manifest), or None. Hashes each shipped model's files: for error messages, not for a hot path."""
    if not PRETRAINED_DIR.is_dir():
        return None
    for folder in sorted(p for p in PRETRAINED_DIR.iterdir() if (p / CONFIG_FILE).is_file()):
        try:
            if model_fingerprint(folder) == fingerprint:
                return folder.name
        except (OSError, ValueError, ImportError):  # a shipped model whose backbone is not installed
            continue
    return None


def create_model(config: ModelConfig) -> AlignModel:
    """Build a model from its config: backbones loaded, heads freshly initialised (class-name vectors encoded)."""
    model = AlignModel(config)
    if model.class_prior is not None:
        model.class_prior.initialize(model.encode_class_names)
    return model


def save_model(model: AlignModel, folder: str | os.PathLike) -> str:
    """Write config + trainable weights atomically (temp folder, then rename); returns the fingerprint."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.config.save(tmp / CONFIG_FILE)
    state = model.trainable_state_dict()
    if state:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        if old.exists():
            _rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        _rmtree(old)
    else:
        tmp.rename(folder)
    return model_fingerprint(folder)


def combine_models(own: AlignModel, companion: AlignModel, weight: float, local_weight: float | None = None
                   ) -> AlignModel:
    """``own`` with ``companion`` as its global companion (:class:`~models.config.CompanionConfig`): photos keep
    ``own``'s regions and get the global vector ``normalize((1 - weight) * own + weight * companion)``;
    ``local_weight`` (default: ``own``'s) is the fused score's w. Both must be trained, share the locked text
    tower and normalise pixels alike (ValueError otherwise). Save it with :func:`save_model`."""
    if own.companion is not None or companion.companion is not None:
        raise ValueError("combine two plain models (neither may have a companion already)")
    data = own.config.to_dict()
    data["global_companion"] = {"model": companion.config.to_dict(), "weight": weight}
    if local_weight is not None:
        data["local_weight"] = local_weight
    config = ModelConfig.from_dict(data)
    assert isinstance(config.global_companion, CompanionConfig)
    model = AlignModel(config)
    state = {**own.trainable_state_dict(),
             **{f"companion.{k}": v for k, v in companion.trainable_state_dict().items()}}
    model.load_state_dict(state, strict=False)
    missing = sorted(set(model.trainable_state_dict()) - set(state))
    if missing:
        raise ValueError(f"the combined model lacks weights: {missing[:5]}")
    return model.to(own.device).eval()


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "auto") -> AlignModel:
    """Load a model folder (or a shipped model by name) in eval mode on ``device``."""
    folder = resolve_model_path(name_or_path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: no {CONFIG_FILE}")
    model = AlignModel(ModelConfig.load(config_file))  # heads (and class-name vectors) come from the weights
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        state = load_file(str(weights))
        expected = model.trainable_state_dict().keys()
        missing = sorted(set(expected) - set(state))
        unknown = sorted(set(state) - set(model.state_dict()))
        if missing or unknown:
            raise ValueError(f"{weights}: weights do not match config (missing {missing[:5]}, unknown {unknown[:5]})")
        model.load_state_dict(state, strict=False)
    elif model.joint is None:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} for the trainable heads")
    model.fingerprint = model_fingerprint(folder)
    model.legacy_fingerprint = legacy_fingerprint(folder)  # what indexes built before fingerprint rule 2 recorded
    model.source = str(folder)
    model.calibration = load_calibration(folder)
    model.reference = load_reference(folder)  # None for a folder without reference.safetensors
    return model.to(resolve_device(device)).eval()


def load_calibration(folder: str | os.PathLike) -> dict:
    """The model folder's ``calibration.json`` (the reference test's ``match`` rules and figures, or an older
    folder's ``min_score``; from ``python -m alignsearch.bench.min_score MODEL --write``); empty when absent or
    unreadable."""
    path = Path(folder) / CALIBRATION_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
