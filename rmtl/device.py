"""The one device resolver: ``auto`` | ``cpu`` | ``cuda`` (or any torch device string)."""

from __future__ import annotations

import ctypes
import sys

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


def cpu_instruction_set() -> str:
    """The widest SIMD level torch dispatches to on this CPU (e.g. AVX2, AVX512), plus the
    native bf16 / AMX extensions Linux reports in /proc/cpuinfo."""
    level = torch.backends.cpu.get_cpu_capability()
    extras = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"})
    return level + (f" ({', '.join(extras)})" if extras else "")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: no flags to read
        pass
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(bf16 autocast pays off on ``device``, why). CPUs without AVX512-BF16 or AMX emulate
    bf16 GEMMs and run them several times slower than fp32, so they get fp32."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"GPU {'supports' if ok else 'lacks'} bf16"
    flags = _cpu_flags()
    if flags & {"amx_bf16", "avx512_bf16"}:
        return True, f"CPU has native bf16 ({', '.join(sorted(flags & {'amx_bf16', 'avx512_bf16'}))})"
    return False, f"CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 (no AVX512-BF16 / AMX)"


def choose_bf16(requested: bool | None, device: torch.device) -> tuple[bool, str]:
    """(use bf16 autocast, a one-line reason for the log); ``requested`` None = automatic."""
    if requested is not None:
        return bool(requested), f"train.bf16={str(bool(requested)).lower()}"
    ok, why = native_bf16(device)
    return ok, f"auto: {why}"


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_kept: str | None = None


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse by this process; returns a reason
    line for the log. Called once per process by CPU training (the Trainer, and
    bench/backbones.py for both libraries it times).

    Why: a training step allocates and frees the same large tensors every step (GEMM
    outputs and gradients, 15-32 MiB each in bench/backbones.py). glibc serves blocks
    above its mmap threshold (at most 32 MiB) with fresh mmaps and unmaps them on free,
    and trims the heap top, so every step page-faults them in again: ~20,000 faults per
    MMoE step, ~10 % of it on the AVX2 VM we measured. With mmap off for allocations
    and trimming only above 2 GiB of free heap top, the memory is reused instead; the
    cost is that the process keeps its peak heap (minus fragmentation) until it exits.
    """
    global _kept
    if _kept is not None:
        return _kept
    _kept = "default malloc (not glibc)"
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 (glibc only; musl has no such symbol)
            if libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1:
                _kept = "glibc malloc keeps freed memory (no mmap per large block, no trim)"
        except (OSError, AttributeError):
            pass
    return _kept
