"""Loss weighting and gradient combination strategies behind one call (see base.py).

    from rmtl.weighting import build_strategy
    strategy = build_strategy("pcgrad", num_tasks=2, seed=0)
    weights = strategy.backward(losses, model, shared=shared, context={"step": step})
"""

from rmtl.weighting.base import Strategy
from rmtl.weighting.registry import (available_strategies, build_strategy, register_strategy, strategy_class,
                                    strategy_name)

__all__ = ["Strategy", "available_strategies", "build_strategy", "register_strategy", "strategy_class",
           "strategy_name"]
