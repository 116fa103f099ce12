"""Checkpoint files: atomic writes and the random-number state a resumed run needs."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rmtl.atomic import atomic_path
from rmtl.errors import DataError


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a reader never sees half a file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    # Our own files hold numpy / python RNG states, which the weights-only loader refuses.
    return torch.load(path, map_location=map_location, weights_only=False)


def load_user_file(path: str | os.PathLike, what: str) -> Any:
    """``load`` of a file a user named (``what``: e.g. "agent checkpoint"): a missing or
    unreadable file is one DataError naming it, not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such {what}", path=path)
    try:
        return load(path)
    except Exception as err:
        raise DataError(f"cannot read {what}: {err}", path=path) from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


_PLAIN = (bool, int, float, str, list, tuple, dict, torch.Tensor, np.ndarray, type(None))


def module_state(module: nn.Module) -> dict:
    """state_dict plus the plain public attributes a strategy keeps outside it
    (e.g. DWA's previous epoch losses, a step counter), so resuming restores them too."""
    plain = {k: copy.deepcopy(v) for k, v in vars(module).items()
             if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN)}
    return {"state_dict": module.state_dict(), "plain": plain}


def load_module_state(module: nn.Module, state: dict) -> None:
    module.load_state_dict(state["state_dict"])
    for key, value in state.get("plain", {}).items():
        setattr(module, key, copy.deepcopy(value))
