"""rmtl: multi-task recommendation with reinforcement-learned loss weights."""

__version__ = "0.1.0"
