"""Which torch device to run on: one small function that the worker needs without the training loop."""

from __future__ import annotations

import torch

from training.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"`` or ``"cuda"``; asking for CUDA where there is
    none is an error that says what to set instead."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' was requested but CUDA is not available; use 'auto' or 'cpu'")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


__all__ = ["resolve_device"]
