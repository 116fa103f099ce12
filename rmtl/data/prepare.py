"""prepare(): raw files -> cached SessionLog, the one call every later stage starts from.

    from rmtl.data.prepare import prepare
    p = prepare("retailrocket")               # embedded synthetic default
    p = prepare("census", "/data/census-income")
    train = p.log.split("train")

With ``data_dir=None`` the package writes synthetic raw files in the real schema once
(into ``<cache root>/synthetic/<schema>-default``) and reads them with the real reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rmtl.data import cache
from rmtl.data import sources as data_sources
from rmtl.data.build import check_split_ratios, check_split_order, build_session_log, encode_values
from rmtl.data.sessionlog import SPLITS, SessionLog
from rmtl.errors import ConfigError, DataError



@dataclass
class Prepared:
    log: SessionLog  # all rows; log.splits = {"train", "val", "test"}; log.split(name) is a view
    summary: dict
    cache_path: Path | None  # the cache entry read or written (None with use_cache=False)
    from_cache: bool
    data_dir: Path | None = None  # the raw files that were (or would have been) read
    _vocab: dict | None = field(default=None, repr=False)

    @property
    def vocabularies(self) -> dict:
        """Per sparse field, a pd.Series raw value -> index as fitted on train (rare
        values -> 1; unseen -> absent, i.e. 0). Read lazily from the cache entry."""
        if self._vocab is None:
            if self.cache_path is None:
                raise DataError("no vocabularies: built without them and without a cache entry")
            self._vocab = cache.load_vocabularies(self.cache_path)
        return self._vocab

    def encode(self, field_name: str, values) -> np.ndarray:
        """Sparse indices of raw ``values`` of one field, exactly as the builder encodes them."""
        if field_name not in self.vocabularies:
            raise DataError(f"no sparse field '{field_name}'; has {sorted(self.vocabularies)}")
        return encode_values(self.vocabularies[field_name], values)


def as_session_log(prepared) -> SessionLog:
    """The SessionLog of a Prepared, or the SessionLog itself: the one way every stage
    accepts "prepared data"."""
    if isinstance(prepared, SessionLog):
        return prepared
    log = getattr(prepared, "log", None)
    if not isinstance(log, SessionLog):
        raise TypeError(f"expected a Prepared (with .log) or a SessionLog, got {type(prepared).__name__}")
    return log


def sources() -> list[str]:
    """Registered data source names (rmtl.data.sources)."""
    return data_sources.source_names()


def reader(source: str):
    return data_sources.reader(source)


def prepare(
    source: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    session_gap: float | None = 1800.0,
    split_ratios: Sequence[float] | None = None,
    split_order: str | None = None,
    min_count: int = 1,
    seed: int = 0,
    reader_options: dict | None = None,
    use_cache: bool = True,
    synthetic: dict | None = None,
) -> Prepared:
    """Build (or reuse from the cache) the SessionLog of ``source``.

    ``cache_dir`` is the cache root (default $RMTL_CACHE or ~/.cache/rmtl). An entry is
    keyed by the source, every option and the input files' fingerprints, so changing
    any of them rebuilds. ``use_cache=False`` neither reads nor writes the cache.
    ``synthetic`` (only with ``data_dir=None``): options of the synthetic writer (users,
    items, seed, task_correlation, ...) instead of the embedded default's.
    """
    read = reader(source)
    options = check_options(source, session_gap=session_gap, split_ratios=split_ratios, split_order=split_order,
                            min_count=min_count, seed=seed, reader_options=reader_options)
    session_gap, ratios, reader_options = options["session_gap"], tuple(options["split_ratios"]), options["reader_options"]
    if synthetic and data_dir is not None:
        raise ConfigError("synthetic options apply only without a data_dir", key="synthetic")
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache.default_root()
    data_path = default_data_dir(source, root, synthetic) if data_dir is None else Path(data_dir).expanduser()
    if not data_path.exists():
        raise DataError(f"no such file or directory; expected the raw {source} files", path=data_path)

    entry = None
    if use_cache:
        files = cache.input_files(data_path, exclude=root)
        material = {"source": source, "options": options, "files": cache.fingerprint(data_path, files)}
        entry = cache.entry_path(root, source, cache.cache_key(**material))
        if cache.exists(entry):
            try:
                log, summary = cache.load(entry)
            except DataError:  # damaged (a column missing, truncated Parquet): rebuild it
                cache.discard(entry)
            else:
                summary["data_dir"] = str(data_path)  # the same files may have moved since
                return Prepared(log, summary, entry, True, data_path)

    kwargs = dict(reader_options)
    if data_sources.get_source(source).reader_takes_session_gap:
        kwargs["session_gap"] = session_gap
    raw = read(data_path, **kwargs)
    vocab: dict = {}
    log, summary = build_session_log(raw, session_gap=session_gap, split_ratios=ratios,
                                     split_order=split_order, min_count=min_count, seed=seed, vocab_out=vocab)
    summary["data_dir"] = str(data_path)
    summary["options"] = options
    if entry is not None:
        cache.save(entry, log, summary, key_material=material, vocab=vocab)
    return Prepared(log, summary, entry, False, data_path, vocab)


def check_options(source: str, *, session_gap, split_ratios, split_order, min_count, seed, reader_options) -> dict:
    """The builder options of a prepare, checked (ConfigError naming the key) and in the
    form the cache key hashes; shared by prepare() and the sharded prepare (rmtl.data.shards)."""
    if session_gap is not None:
        try:
            session_gap = float(session_gap)
        except (TypeError, ValueError):
            raise ConfigError(f"expected seconds or None, got {session_gap!r}", key="session_gap") from None
        if not (math.isfinite(session_gap) and session_gap > 0):
            raise ConfigError(f"expected positive seconds or None, got {session_gap!r}", key="session_gap")
    ratios = check_split_ratios(data_sources.default_split_ratios(source) if split_ratios is None else split_ratios)
    check_split_order(split_order, source)
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ConfigError(f"must be an integer >= 1, got {min_count!r}", key="min_count")
    return {
        "session_gap": session_gap,
        "split_ratios": list(ratios),
        "split_order": split_order,
        "min_count": int(min_count),
        "seed": int(seed),
        "reader_options": dict(reader_options or {}),
    }


def default_data_dir(source: str, root: Path, options: dict | None = None) -> Path:
    """Synthetic raw files of ``source``, written once under ``root/synthetic``: the
    embedded default (``<source>-default``), or one folder per set of writer options."""
    from rmtl.data import synthetic

    if source not in synthetic.schemas():
        raise DataError(f"'{source}' has no embedded synthetic default; give the folder of the real files "
                        f"(--data-dir DIR / data_dir=...)")
    options = dict(options or {})
    options.setdefault("seed", 0)
    version = synthetic.writer_version(source)
    if options == {"seed": 0}:
        out = root / "synthetic" / f"{source}-default-{version}"
    else:
        digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:12]
        out = root / "synthetic" / f"{source}-{digest}-{version}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cache.remove_stale_temporaries(out.parent)  # a killed writer's half-written folders
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-p{os.getpid()}-{out.name}-", dir=out.parent))
    try:
        synthetic.write_synthetic(source, tmp, **options)
        try:
            os.replace(tmp, out)
        except OSError:
            if not out.is_dir():  # somebody else wrote it first: use theirs
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def format_summary(summary: dict) -> str:
    """A short human-readable report of a prepare() summary."""
    lines = [
        f"source        {summary.get('source')}" + (f"  ({summary['data_dir']})" if summary.get("data_dir") else ""),
        f"events read   {summary.get('events_read', 0):,}",
        f"impressions   {summary.get('impressions', 0):,}",
        f"rows kept     {summary.get('rows', 0):,}",
        f"sessions      {summary.get('sessions', 0):,}",
        f"users         {summary.get('users', 0):,}",
        f"items         {summary.get('items', 0):,}",
    ]
    tasks = summary.get("tasks", [])
    splits = summary.get("splits", {})
    if splits:
        width = max(8, *(len(t) + 2 for t in tasks)) if tasks else 8
        head = f"{'split':<6} {'sessions':>10} {'rows':>11}" + "".join(f"{'pos ' + t:>{width + 4}}" for t in tasks)
        lines += ["", head]
        for name in SPLITS:
            s = splits.get(name)
            if s is None:
                continue
            rates = "".join(
                f"{('-' if s['positive_rate'].get(t) is None else format(s['positive_rate'][t], '.4f')):>{width + 4}}"
                for t in tasks
            )
            lines.append(f"{name:<6} {s['sessions']:>10,} {s['rows']:>11,}{rates}")
    dropped = summary.get("dropped", {})
    items = [(stage, reason, n) for stage in ("reader", "builder") for reason, n in dropped.get(stage, {}).items()]
    lines.append("")
    if items:
        lines.append("rows dropped")
        for stage, reason, n in items:
            lines.append(f"  {n:>11,}  {reason}  ({stage})")
    else:
        lines.append("rows dropped  none")
    notes = summary.get("notes") or {}
    if notes:
        lines.append("rows kept, noted")
        for reason, n in notes.items():
            lines.append(f"  {n:>11,}  {reason}")
    kept = summary.get("sessions_kept")
    if kept:
        rates = "  ".join(f"{t} {kept['rate_all'][t]:.4f}->{kept['rate_kept'][t]:.4f}"
                          for t in kept["rate_all"] if kept["rate_all"][t] is not None and kept["rate_kept"][t] is not None)
        lines.append(f"session rule  keeps {kept['share']:.1%} of the impressions" + (f"; positive rate all->kept  {rates}" if rates else ""))
    for warning in summary.get("warnings") or []:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)
