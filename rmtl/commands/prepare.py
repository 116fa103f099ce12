"""`rmtl prepare`: raw files -> cached SessionLog, and a summary of what was built."""

from __future__ import annotations

import argparse
import json

from rmtl.data.prepare import format_summary, prepare, sources
from rmtl.data.shards import AUTO_SHARD_BYTES, DEFAULT_SHARDS, MAX_SHARDS, check_shards, prepare_sharded
from rmtl.data.sources import get_source
from rmtl.errors import ConfigError


def _gap(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds or 'none', got {text!r}")
    return value


def _ratios(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.replace(":", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.6,0.2,0.2, got {text!r}")
    return values  # type: ignore[return-value]


def _reader_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = json.loads(value)  # numbers, true/false, lists; anything else stays a string
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def _shards(text: str) -> int | str:
    try:
        return check_shards(text.strip() if text.strip() == DEFAULT_SHARDS else int(text))
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"expected '{DEFAULT_SHARDS}' or a whole number of shards in 1..{MAX_SHARDS}, "
                                         f"got {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="build (or reuse) the cached SessionLog of a source",
        description="Read raw files, cut sessions, split 6:2:2, fit vocabularies on train, cache the "
                    "SessionLog and print a summary. Without --data-dir the embedded synthetic default is used.",
    )
    p.add_argument("--source", required=True, choices=sources(), help="raw data source")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder (or file, for census) of the raw files; default: synthetic files written by rmtl")
    p.add_argument("--out", default=None, metavar="CACHE", help="cache root (default $RMTL_CACHE or ~/.cache/rmtl)")
    p.add_argument("--session-gap", type=_gap, default=1800.0, metavar="SECONDS|none",
                   help="inactivity gap that starts a new session (default 1800); 'none' = one session per user")
    p.add_argument("--min-count", type=int, default=1, metavar="N",
                   help="values seen fewer than N times in train share the rare bucket (default 1)")
    p.add_argument("--split-order", choices=["time", "random"], default=None,
                   help="order of sessions before the 6:2:2 split (default: time; census: random)")
    p.add_argument("--split-ratios", type=_ratios, default=None, metavar="TRAIN,VAL,TEST",
                   help="fractions of the rows (whole sessions) in train, val, test (default 0.6,0.2,0.2; census "
                        "0.5,0.25,0.25 as configs/census.yaml; with census-income.data and .test both present, "
                        ".test is the test split and TRAIN:VAL divides .data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split order (default 0)")
    p.add_argument("--reader-option", type=_reader_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the source's reader (VALUE parsed as JSON when it can be); repeatable")
    p.add_argument("--no-cache", action="store_true", help="build without reading or writing the cache")
    p.add_argument("--shards", type=_shards, default=None, metavar=f"N|{DEFAULT_SHARDS}",
                   help=f"kuairand only: out-of-core prepare, the log streamed into N user-partitioned Parquet "
                        f"shards in the cache root (docs/shards.md); '{DEFAULT_SHARDS}': one shard per "
                        f"{AUTO_SHARD_BYTES >> 20} MB of raw log, so memory does not grow with the log's rows")
    p.add_argument("--strict", action="store_true",
                   help="a release folder missing one of its published files is an error, not a warning "
                        "(kuairand, census; RetailRocket needs every file anyway)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = dict(args.reader_option)
    if args.strict and get_source(args.source).reader_takes_strict:  # others need every file anyway
        options["strict"] = True
    if args.shards is not None:
        return _run_sharded(args, options)
    result = prepare(
        args.source, args.data_dir, cache_dir=args.out, session_gap=args.session_gap,
        min_count=args.min_count, split_ratios=args.split_ratios, split_order=args.split_order, seed=args.seed,
        reader_options=options, use_cache=not args.no_cache,
    )
    print(format_summary(result.summary))
    print()
    if result.cache_path is None:
        print("cache: not used (--no-cache)")
    elif result.from_cache:
        print(f"cache: hit, read {result.cache_path}")
    else:
        print(f"cache: miss, wrote {result.cache_path}")
    return 0


def _run_sharded(args: argparse.Namespace, options: dict) -> int:
    if args.source != "kuairand":
        raise ConfigError(f"out-of-core prepare reads KuaiRand logs only, got --source {args.source}", key="shards")
    if args.no_cache:
        raise ConfigError("the shards are written into the cache root (--out); --no-cache does not apply", key="shards")
    if args.data_dir is None:
        raise ConfigError("expected --data-dir: the folder of the KuaiRand release to shard", key="data_dir")
    result = prepare_sharded(
        args.data_dir, shards=args.shards, cache_dir=args.out, session_gap=args.session_gap, min_count=args.min_count,
        split_ratios=args.split_ratios, split_order=args.split_order, seed=args.seed, reader_options=options,
        progress=lambda line: print(line, flush=True),
    )
    print(format_summary(result.summary))
    print()
    state = "hit, read" if result.from_cache else "miss, wrote"
    print(f"shards: {state} {result.path} ({len(result.meta['shards'])} shard files)")
    return 0
