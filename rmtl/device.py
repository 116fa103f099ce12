"""The one device resolver: ``auto`` | ``cpu`` | ``cuda`` (or any torch device string)."""

from __future__ import annotations

import torch

from rmtl.errors import ConfigError


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` is cuda when present, else cpu; asking for cuda on a machine without it is a
    ConfigError naming ``key`` (the config key the name came from), not a crash mid-run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine; use cpu or auto", key=key)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"expected auto, cpu or cuda, got '{name}'", key=key) from None
