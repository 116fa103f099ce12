"""Checkpoint files: atomic writes, safe loading and the random-number state a resumed run needs.

Every load goes through torch's weights-only unpickler: a checkpoint may hold tensors,
plain containers and numbers, plus numpy arrays / scalars / dtypes (the numpy RNG state
and strategies' plain attributes), nothing else. A crafted file naming any other callable
is refused before any of its code runs, so a file a user names (``--resume``,
``--backbone FILE``, ``strategy.options.checkpoint``) cannot execute code.
"""

from __future__ import annotations

import copy
import os
import pickle
import random
import re
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
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk this way
            raise OSError(getattr(err, "errno", None) or 28, f"torch.save failed: {str(err).splitlines()[0]}") from None
    return Path(path)


def _numpy_globals() -> list:
    """The numpy callables an array, a scalar or a dtype pickles through: they only build
    arrays / scalars from bytes (object-dtype contents still pass the same restricted
    unpickler), so allowing them lets numpy RNG states load without opening the door."""
    multiarray = getattr(np, "_core", None)
    multiarray = multiarray.multiarray if multiarray is not None else np.core.multiarray
    dtype_classes = {type(np.dtype(t)) for t in ("bool", "int8", "int16", "int32", "int64", "uint8",
                                                 "uint16", "uint32", "uint64", "float16", "float32", "float64")}
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtype_classes]


SAFE_GLOBALS = _numpy_globals()


def load(path: str | os.PathLike, map_location="cpu") -> Any:
    """torch.load with the weights-only unpickler and the numpy allow-list (never a full pickle)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_user_file(path: str | os.PathLike, what: str) -> Any:
    """``load`` of a file a user named (``what``: e.g. "agent checkpoint", "last.pt of the
    run to resume"): a missing, truncated, corrupt or unsafe file is one DataError naming it,
    not a traceback, and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such {what}", path=path)
    try:
        return load(path)
    except pickle.UnpicklingError as err:
        text = str(err)
        # torch words it "Unsupported global: GLOBAL x.y" or, for a blocked module such as os,
        # "Trying to load unsupported GLOBAL x.y whose module x is blocked"
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", text, re.IGNORECASE)
        if found:
            raise DataError(f"refused to load {what}: it names '{found.group(1)}', which is not a tensor, number, "
                            "container or numpy array (only weights and plain data are loaded, never code; "
                            "a whole pickled model cannot be loaded: save its state_dict)", path=path) from None
        raise DataError(f"cannot read {what}: not a valid checkpoint ({_first_line(text)})", path=path) from None
    except Exception as err:
        raise DataError(f"cannot read {what}: truncated or not a torch checkpoint ({_first_line(str(err))})",
                        path=path) from None


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # torch's weights-only message puts the cause after its advice
        if "WeightsUnpickler error" in ln:
            return ln
    return lines[0] if lines else "unknown error"


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
