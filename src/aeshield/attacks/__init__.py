"""Attacks: plain functions ``attack(model, x, y, **settings) -> x_adv``, model wrappers, and
the registry through which everything runs them (``run_attack``)."""

import importlib
import pkgutil

from .adaptive import detector_pgd, latent_pgd, orthogonal_pgd, reconstruction_pgd
from .autoattack import AUTOATTACK_PARTS, autoattack
from .bpda import BPDA
from .cw import cw_l2
from .eot import EOT
from .gradient import bim, fgsm, input_gradient, pgd
from .losses import LOSSES, cross_entropy, dlr, margin
from .registry import AuditHook, Stage, attack_names, get_attack, register, run_attack, unregister

# Every module of this package is imported, so that a new attack is one module that registers
# itself (no list to extend); the explicit imports above fix the built-ins' order.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
del _module

__all__ = ["AUTOATTACK_PARTS", "BPDA", "EOT", "LOSSES", "AuditHook", "Stage", "attack_names",
           "autoattack", "bim", "cross_entropy", "cw_l2", "detector_pgd", "dlr", "fgsm",
           "get_attack", "input_gradient", "latent_pgd", "margin", "orthogonal_pgd", "pgd",
           "reconstruction_pgd", "register", "run_attack", "unregister"]
