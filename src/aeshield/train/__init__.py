"""Training loops returning result records, with checkpoints and resume."""

from .loop import LoopConfig, LoopResult, fit

__all__ = ["LoopConfig", "LoopResult", "fit"]
