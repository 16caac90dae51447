"""Threat models: the set of perturbations an adversary may use.

Every attack in aeshield returns points that satisfy ``ThreatModel.contains`` because
``ThreatModel.project`` is applied as the last step of each attack, whatever the attack's
internals did (the foolbox idea of a final projection that no subclass can skip).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

import torch


class Norm(str, Enum):
    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        if isinstance(value, Norm):
            return value
        lowered = str(value).strip().lower().replace("-", "")
        for norm in cls:
            if norm.value.lower() == lowered:
                return norm
        if lowered in {"inf", "linfinity", "l_inf"}:
            return cls.LINF
        from .errors import ConfigError

        raise ConfigError(f"unknown norm {value!r}; use one of: Linf, L2")


@dataclass(frozen=True)
class ThreatModel:
    """An eps-ball around the clean input, intersected with the valid pixel box.

    ``norm`` is ``Linf`` or ``L2``; ``eps`` is measured in pixel units of [0, 1] images
    (L2: over all pixels of one image).
    """

    norm: Norm = Norm.LINF
    eps: float = 0.3
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        from .errors import ConfigError

        object.__setattr__(self, "norm", Norm.parse(self.norm))
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (self.eps >= 0):
            raise ConfigError(f"eps must be a number >= 0, got {self.eps!r}")
        lo, hi = self.bounds
        if not lo < hi:
            raise ConfigError(f"bounds must satisfy low < high, got {self.bounds}")
        if self.norm is Norm.LINF and self.eps > hi - lo:
            raise ConfigError(f"an L-inf eps of {self.eps} exceeds the pixel range [{lo}, {hi}]: every image "
                              f"would be reachable; eps is in pixel units, e.g. 0.3 or 8/255")

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Nearest point (in the norm's sense) of the eps-ball around ``x``, clipped to bounds."""
        delta = x_adv - x
        if self.norm is Norm.LINF:
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            factor = (self.eps / norms).clamp(max=1.0)
            delta = delta * factor.view(-1, *([1] * (delta.dim() - 1)))
        return (x + delta).clamp(*self.bounds)

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-example distance in this threat model's norm."""
        flat = (x_adv - x).flatten(1)
        if self.norm is Norm.LINF:
            return flat.abs().amax(dim=1)
        return flat.norm(dim=1)

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
        """Per-example boolean: inside the ball (up to ``tol``) and inside the bounds."""
        lo, hi = self.bounds
        in_box = (x_adv >= lo - tol).flatten(1).all(1) & (x_adv <= hi + tol).flatten(1).all(1)
        return in_box & (self.distance(x_adv, x) <= self.eps + tol)

    def with_eps(self, eps: float) -> "ThreatModel":
        return ThreatModel(self.norm, eps, self.bounds)

    def describe(self) -> str:
        return f"{self.norm.value} eps={self.eps:g}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["norm"] = self.norm.value
        d["bounds"] = list(self.bounds)
        return d
