"""Experiments as data: YAML targets resolved and run by one runner."""

from .config import ExperimentConfig, list_targets, load_config
from .runner import Runner, reproduce

__all__ = ["ExperimentConfig", "Runner", "list_targets", "load_config", "reproduce"]
