"""Multi-task backbones: ``build(name, spec, **options)``, ``available()``, ``register``.

Every backbone maps (sparse [B, F] int64, dense [B, D] float32) to logits [B, K]; see
base.py for the contract a user's own module must meet and docs/backbones.md.
"""

from rmtl.backbones.registry import available, build, name_of, register, resolve

__all__ = ["available", "build", "name_of", "register", "resolve"]
