"""alignsearch models: encoders for images and texts into one joint space, alignment scores, training.

The names below load on first use (PEP 562), so ``import alignsearch.models.config`` or ``.data`` does not pull in
torch and transformers; ``from alignsearch.models import load_model`` works as before."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BackboneConfig": "config", "HeadConfig": "config", "ModelConfig": "config",
    "create_model": "factory", "load_model": "factory", "model_fingerprint": "factory", "save_model": "factory",
    "AlignModel": "model", "EncoderOutput": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
