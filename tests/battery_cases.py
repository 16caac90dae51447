"""Pipelines whose audit battery is pinned in ``fixtures/audit_battery.json`` (generated from the
hand-written battery before attacks declared audit hooks)."""

from __future__ import annotations

import torch
from torch import nn

from aeshield.defenses import Detector, Purifier, Shielded
from aeshield.threat import ThreatModel


class _Clamp(Purifier):
    def forward(self, x):
        return x.clamp(0.1, 0.9)


class _Coded(Purifier):
    def encode(self, x):
        return x.flatten(1)

    def decode(self, z):
        return z.view(-1, 1, 28, 28)

    def forward(self, x):
        return self.decode(self.encode(x))


class _Bright(Detector):
    def score(self, x):
        return x.flatten(1).mean(1)


def _classifier() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))


def battery_cases():
    """(case name, model, threat, budget, random, surrogate) for every branch of the battery."""
    clf = _classifier()
    models = {"bare": clf, "no-purifier": Shielded(None, clf), "purifier": Shielded(_Clamp(), clf),
              "encoder": Shielded(_Coded(), clf), "detector": Shielded(_Clamp(), clf, _Bright()),
              "detector-only": Shielded(None, clf, _Bright())}
    threats = {"linf": ThreatModel("Linf", 0.3), "l2": ThreatModel("L2", 2.0)}
    for (model_name, model) in models.items():
        for threat_name, threat in threats.items():
            for budget in ("quick", "standard"):
                for random in (False, True):
                    for surrogate in (None, clf):
                        name = f"{model_name}/{threat_name}/{budget}/" \
                               f"{'random' if random else 'fixed'}/{'surrogate' if surrogate else 'alone'}"
                        yield name, model, threat, budget, random, surrogate


def battery_dicts(build_battery) -> dict:
    torch.manual_seed(0)
    return {name: [s.to_dict() for s in build_battery(model, threat, budget, random=random,
                                                       surrogate=surrogate)]
            for name, model, threat, budget, random, surrogate in battery_cases()}
