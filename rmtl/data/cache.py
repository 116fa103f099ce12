"""The SessionLog cache: Parquet for the rows and the vocabularies, JSON for spec, splits, summary.

An entry lives in ``<root>/<source>-<key>/`` where ``key`` hashes the source, every
option and a fingerprint of every input file (relative name, size, mtime and a hash of
its first and last MiB). It is written into a temporary folder and renamed into place
with ``os.replace``, so a crash never leaves a half-written entry under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rmtl.atomic import remove_stale
from rmtl.data.sessionlog import SessionLog
from rmtl.data.spec import FeatureSpec
from rmtl.errors import DataError

# Bump when the builder's output changes meaning, so old entries are not reused.
FORMAT_VERSION = 2
ROWS_FILE = "rows.parquet"
VOCAB_FILE = "vocab.parquet"
META_FILE = "meta.json"
_MIB = 1 << 20


def default_root() -> Path:
    """$RMTL_CACHE, else ~/.cache/rmtl."""
    env = os.environ.get("RMTL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rmtl"


def input_files(path: str | Path, *, exclude: Path | None = None) -> list[Path]:
    """Regular files under ``path`` (or the file itself), skipping hidden entries and
    anything inside ``exclude`` (a cache root kept inside the data folder)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError("no such file or directory", path=path)
    excl = exclude.resolve() if exclude is not None else None
    if excl is not None and not excl.is_relative_to(path.resolve()):
        excl = None  # only a cache root kept INSIDE the data folder is skipped
    files = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if excl is not None and f.resolve().is_relative_to(excl):
            continue
        files.append(f)
    return files


def fingerprint(path: str | Path, files: list[Path]) -> list[dict]:
    """Name, size, mtime and a hash of the first and last MiB of each file."""
    base = Path(path)
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.blake2b(digest_size=16)
        with open(f, "rb") as fh:
            h.update(fh.read(_MIB))
            if st.st_size > _MIB:
                fh.seek(max(st.st_size - _MIB, _MIB))
                h.update(fh.read(_MIB))
        name = f.name if base.is_file() else str(f.relative_to(base))
        out.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail": h.hexdigest()})
    return out


def cache_key(source: str, options: dict, files: list[dict]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "source": source, "options": options, "files": files},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_path(root: str | Path, source: str, key: str) -> Path:
    return Path(root) / f"{source}-{key}"


def exists(path: str | Path) -> bool:
    path = Path(path)
    return (path / ROWS_FILE).is_file() and (path / META_FILE).is_file()


def save(path: str | Path, log: SessionLog, summary: dict, *, key_material: dict | None = None,
         vocab: dict | None = None) -> Path:
    """Write ``log``, ``summary`` (and the vocabularies, if given) to ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-p{os.getpid()}-{path.name}-", dir=path.parent))
    except OSError as err:
        raise DataError(f"cannot write the cache here ({err.strerror or err}); pick another with --out / "
                        "data.cache_dir or $RMTL_CACHE", path=path.parent) from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; entries may be shared
        pq.write_table(_to_table(log), tmp / ROWS_FILE, compression="lz4")
        if vocab is not None:
            pq.write_table(_vocab_table(vocab), tmp / VOCAB_FILE, compression="lz4")
        meta = {
            "format": FORMAT_VERSION,
            "spec": log.spec.to_dict(),
            "splits": {k: list(v) for k, v in log.splits.items()},
            "num_rows": log.num_rows,
            "num_sessions": log.num_sessions,
            "summary": summary,
            "key_material": key_material,
            # raw values are stored as text; their dtypes bring them back on load
            "vocab_dtypes": None if vocab is None else {k: _value_dtype(v.index) for k, v in vocab.items()},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=_json_default))
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished the same entry first (non-empty target): keep theirs.
            if not exists(path):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as err:  # disk full, read-only: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the cache entry ({err.strerror or str(err).splitlines()[0]}); nothing was "
                        "written; free some space or pick another cache with --out / $RMTL_CACHE", path=path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def remove_stale_temporaries(root: str | Path) -> int:
    """Delete the ``.tmp-*`` folders a killed process left behind: those whose writer's pid
    (in the name) is gone, or, from older versions without one, older than 6 h."""
    return remove_stale(root, ".tmp-*")


def load(path: str | Path) -> tuple[SessionLog, dict]:
    """Read an entry written by :func:`save`."""
    path = Path(path)
    if not exists(path):
        raise DataError(f"not a SessionLog cache entry; expected {ROWS_FILE} and {META_FILE}", path=path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        spec = FeatureSpec.from_dict(meta["spec"])
        table = pq.read_table(path / ROWS_FILE)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise DataError(f"unreadable cache entry ({err}); delete it to rebuild", path=path) from None
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"cache format {meta.get('format')}, expected {FORMAT_VERSION}; delete it to rebuild", path=path)
    try:
        return _log_from(table, meta, spec), meta["summary"]
    except (KeyError, ValueError, TypeError, IndexError, pa.ArrowException) as err:
        raise DataError(f"unreadable cache entry (missing or damaged column: {err}); delete it to rebuild",
                        path=path) from None


def discard(path: str | Path) -> None:
    """Remove a damaged entry so the next save can take its place (renamed aside first, so
    a reader never sees it half-deleted)."""
    path = Path(path)
    aside = path.with_name(f".tmp-p{os.getpid()}-discarded-{path.name}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _log_from(table: pa.Table, meta: dict, spec: FeatureSpec) -> SessionLog:
    n = table.num_rows

    def col(name: str, dtype) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype, copy=False)

    def block(prefix: str, names: list[str], dtype) -> np.ndarray:
        if not names:
            return np.zeros((n, 0), dtype=dtype)
        # one stack along axis 1 (row-major writes), not a strided fill per column
        return np.stack([table.column(f"{prefix}{name}").to_numpy() for name in names], axis=1).astype(dtype, copy=False)

    session = col("session", np.int64)
    lengths = np.bincount(session, minlength=meta["num_sessions"])
    session_ptr = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=session_ptr[1:])
    log = SessionLog(
        spec=spec,
        session_ptr=session_ptr,
        user=col("user", np.int64),
        item=col("item", np.int64),
        time=col("time", np.int64),
        sparse=block("s:", spec.sparse_fields, np.int64),
        dense=block("d:", spec.dense_fields, np.float32),
        labels=block("y:", spec.tasks, np.float32),
        splits={k: (int(v[0]), int(v[1])) for k, v in meta["splits"].items()},
    )
    return log


def load_vocabularies(path: str | Path) -> dict[str, pd.Series]:
    """Per sparse field, raw value -> index as fitted on train (see build.encode_values)."""
    path = Path(path)
    if not (path / VOCAB_FILE).is_file():
        raise DataError(f"no {VOCAB_FILE} in this cache entry (built without vocabularies)", path=path)
    dtypes = json.loads((path / META_FILE).read_text()).get("vocab_dtypes") or {}
    frame = pq.read_table(path / VOCAB_FILE).to_pandas()
    out = {}
    for name in dtypes:  # in field order, including fields with an empty vocabulary
        part = frame[frame["field"] == name]
        values = pd.Index(part["value"].to_numpy(dtype=object))
        try:
            values = values.astype(dtypes[name])
        except (TypeError, ValueError):
            pass  # mixed-type values stay text
        out[name] = pd.Series(part["index"].to_numpy(dtype=np.int64), index=values, name=name)
    return out


def _value_dtype(index: pd.Index) -> str:
    dtype = index.dtype
    return str(dtype.categories.dtype if isinstance(dtype, pd.CategoricalDtype) else dtype)


def _vocab_table(vocab: dict) -> pa.Table:
    fields = [np.full(len(v), k, dtype=object) for k, v in vocab.items()]
    values = [v.index.astype(str).to_numpy(dtype=object) for v in vocab.values()]
    indices = [v.to_numpy(dtype=np.int64) for v in vocab.values()]
    cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
    return pa.table({
        "field": pa.array(cat(fields, object), type=pa.string()).dictionary_encode(),
        "value": pa.array(cat(values, object), type=pa.string()),
        "index": pa.array(cat(indices, np.int64), type=pa.int64()),
    })


def _to_table(log: SessionLog) -> pa.Table:
    spec = log.spec
    cols = {
        "session": log.session_of_row(),
        "user": log.user,
        "item": log.item,
        "time": log.time,
    }
    # Narrow integer types where they fit: smaller files, faster re-reads.
    for j, name in enumerate(spec.sparse_fields):
        cols[f"s:{name}"] = _narrow(log.sparse[:, j], spec.cardinalities[j])
    for j, name in enumerate(spec.dense_fields):
        cols[f"d:{name}"] = np.ascontiguousarray(log.dense[:, j])
    for k, name in enumerate(spec.tasks):
        cols[f"y:{name}"] = log.labels[:, k].astype(np.int8)
    return pa.table(cols)


def _narrow(values: np.ndarray, bound: int) -> np.ndarray:
    for dtype in (np.int8, np.int16, np.int32):
        if bound <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return np.ascontiguousarray(values)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)  # Paths and other option values: their text is enough for a record
