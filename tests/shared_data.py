"""Where the read-only real data of ../shared/data lives (never copied into the repo).

The repo normally sits beside ``shared/`` (CI: ``<repo>/../shared``); a git worktree may
sit deeper (``/work/wt/iN`` with ``/work/shared``), so the folders above the repo are tried
in turn, then $RMTL_SHARED_DATA. Tests skip with a reason when the data is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    candidates = [parent / "shared" / "data" for parent in REPO.parents]
    if os.environ.get("RMTL_SHARED_DATA"):
        candidates.insert(0, Path(os.environ["RMTL_SHARED_DATA"]))
    return next((c for c in candidates if c.is_dir()), None)


def shared_path(*parts: str) -> Path:
    """A path under the shared data folder; skips the calling test when it is absent."""
    root = shared_data_dir()
    path = root.joinpath(*parts) if root is not None else None
    if path is None or not path.exists():
        pytest.skip(f"real data {'/'.join(parts)} not found beside the repo (../shared/data) or in $RMTL_SHARED_DATA")
    return path
