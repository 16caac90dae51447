"""Attacks: plain functions ``attack(model, x, y, **settings) -> x_adv``, and model wrappers."""

from .adaptive import detector_pgd, latent_pgd, orthogonal_pgd, reconstruction_pgd
from .autoattack import AUTOATTACK_PARTS, autoattack
from .bpda import BPDA
from .cw import cw_l2
from .eot import EOT
from .gradient import bim, fgsm, input_gradient, pgd
from .losses import LOSSES, cross_entropy, dlr, margin

__all__ = ["AUTOATTACK_PARTS", "BPDA", "EOT", "LOSSES", "autoattack", "bim", "cross_entropy",
           "cw_l2", "detector_pgd", "dlr", "fgsm", "input_gradient", "latent_pgd", "margin", "orthogonal_pgd",
           "pgd", "reconstruction_pgd"]
