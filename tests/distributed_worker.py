"""What ``tests/test_distributed.py`` runs, under ``torchrun`` (several ranks) or alone (one
process): the same scenario either way, its result written by rank 0 to ``OUT``.

    python tests/distributed_worker.py SCENARIO OUT
    torchrun --nproc-per-node 2 tests/distributed_worker.py SCENARIO OUT

Scenarios:
- ``evaluate``: a cascade (FGSM, PGD with restarts) on a deterministic classifier and an EOT
  cascade on a random pipeline, then a quick audit of the random pipeline; writes the records
  and the audit's report (timings left out).
- ``trainers``: Madry AT ("free" schedule), a classifier with augmentation, a MagNet
  autoencoder and a DBP VAE, in float64; writes their weights.
- ``reproduce``: the runner on the small target in ``$CONFIG``; writes its table's cells.
- ``aaa``: AAA in float64 on a shield without BatchNorm; writes the weights. With
  ``DIE_AT=K`` rank 1 kills itself (SIGKILL) at its K-th classifier forward; with
  ``CHECKPOINT=path`` it checkpoints every 2 steps there (and resumes from it).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import torch
from torch import nn

from aeshield import distributed
from aeshield.threat import ThreatModel


def tiny_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 10))


def tiny_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


class NoisyShield(nn.Module):
    """A random purifier: Gaussian noise from the global random state (as S2SNet's layers)."""

    stochastic = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 0.05 * torch.randn_like(x)).clamp(0, 1)


def _without_timings(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k != "created"}
    record["attacks"] = [{k: v for k, v in a.items() if k not in ("seconds", "peak_memory_mb")}
                         for a in record["attacks"]]
    return record


def evaluate_scenario(out: str) -> dict:
    from aeshield.defenses.base import Shielded
    from aeshield.eval.audit import audit
    from aeshield.eval.harness import AttackSpec, evaluate

    classifier = tiny_classifier().eval()
    x, _ = tiny_data(40)
    with torch.no_grad():  # labels the classifier gets right on clean images
        y = classifier(x).argmax(1)
    threat = ThreatModel("Linf", 0.03)
    cascade = [AttackSpec("fgsm"), AttackSpec("pgd", {"steps": 5, "step_size": 0.01, "restarts": 2})]
    plain = evaluate(classifier, x, y, cascade, threat, batch_size=6, seed=3, progress=False)
    random = Shielded(NoisyShield(), classifier)
    eot = [AttackSpec("pgd", {"steps": 4, "step_size": 0.01}, wrap="eot", eot_samples=3)]
    noisy = evaluate(random, x, y, eot, threat, batch_size=6, seed=3, progress=False)
    report = audit(random, x[:24], y[:24], threat, budget="quick", progress=False, batch_size=8,
                   plots=False, seed=5)
    summary = json.loads(json.dumps(report.to_dict(), default=str))
    return {"plain": _without_timings(plain.to_dict()), "noisy": _without_timings(noisy.to_dict()),
            "audit": {"robust_flags": report.record.robust_flags,
                      "record": _without_timings(report.record.to_dict()),
                      "checks": [c.to_dict() for c in report.checks],
                      "sweeps": summary.get("sweeps")}}


class DyingClassifier(nn.Module):
    """A frozen classifier whose rank-1 copy dies (SIGKILL) at its ``die_at``-th forward."""

    def __init__(self, inner: nn.Module, die_at: int | None) -> None:
        super().__init__()
        self.inner, self.die_at, self.calls = inner, die_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.die_at is not None and distributed.world().rank == 1 and self.calls >= self.die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def aaa_scenario(out: str) -> dict:
    from aeshield.defenses.aaa import AAAConfig, train_aaa

    torch.set_default_dtype(torch.float64)
    classifier = tiny_classifier().eval()
    x, y = tiny_data(48)
    torch.manual_seed(7)
    shield = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1), nn.Sigmoid())
    initial = {k: v.tolist() for k, v in shield.state_dict().items()}
    die_at = int(os.environ["DIE_AT"]) if os.environ.get("DIE_AT") else None
    config = AAAConfig(eps=0.1, step_size=0.03, attack_steps=3, epochs=3, batch_size=8, lr=0.01,
                       warmup_steps=2, checkpoint_every=2, val_attack_steps=2)
    result = train_aaa(shield, [DyingClassifier(classifier, die_at)], x, y, config,
                       checkpoint=os.environ.get("CHECKPOINT") or None, progress=False)
    return {"weights": {k: v.tolist() for k, v in shield.state_dict().items()},
            "initial": initial, "steps": result.loop.steps, "history": result.history}


def trainers_scenario(out: str) -> dict:
    """Every other trainer kind in float64: Madry AT on the "free" schedule (updates inside a
    step, a carried perturbation), a classifier with crop-and-flip augmentation, a MagNet
    autoencoder (noise per example), and a DBP VAE (sampled z, the penalty's random projections
    and a double backward)."""
    import torch.nn.functional as F

    from aeshield.defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training
    from aeshield.defenses.dbp import VAE, DBPConfig, train_vae
    from aeshield.defenses.magnet import MagNetTrainConfig, train_magnet_autoencoder
    from aeshield.train.classifier import augment_batch
    from aeshield.train.loop import LoopConfig, fit

    torch.set_default_dtype(torch.float64)
    x, y = tiny_data(32)
    weights = {}

    model = tiny_classifier(1)
    adversarial_training(model, x, y, AdversarialTrainingConfig(
        eps=0.1, step_size=0.03, attack_steps=2, epochs=2, batch_size=8, lr=0.01, schedule="free",
        replays=2, val_attack_steps=1), progress=False)
    weights["adversarial training (free)"] = model

    model = tiny_classifier(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step(xb, yb, gen):
        loss = F.cross_entropy(model(augment_batch(xb, gen, pad=2)), yb)
        return loss, {"loss": loss.detach()}
    fit({"model": model}, optimizer, step, x, y, LoopConfig(epochs=2, batch_size=8), progress=False)
    weights["classifier (augmented, SGD)"] = model

    torch.manual_seed(3)
    autoencoder = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
    train_magnet_autoencoder(autoencoder, x, MagNetTrainConfig(epochs=2, batch_size=8, lr=0.01),
                             x_val=x[:8], progress=False)
    weights["MagNet autoencoder"] = autoencoder

    torch.manual_seed(4)
    vae = VAE(latent=4, hidden=16, in_shape=(1, 8, 8))
    train_vae(vae, x, DBPConfig(lambda2=0.1, epochs=2, batch_size=8, lr=0.01), progress=False)
    weights["DBP VAE"] = vae
    return {"trainers": {name: {k: v.tolist() for k, v in m.state_dict().items()}
                         for name, m in weights.items()}}


def reproduce_scenario(out: str) -> dict:
    """The runner on the target in ``$CONFIG`` (a JSON config), its folders beside ``out``."""
    from pathlib import Path

    from aeshield.experiments import Runner
    from aeshield.experiments.config import from_dict

    config = from_dict(json.loads(Path(os.environ["CONFIG"]).read_text()), "quick")
    folder = Path(out).parent
    runner = Runner(config, folder / "results", artifacts=folder / "artifacts", use_shipped=False,
                    progress=False)
    table = runner.run() / "table.json"
    return {"table": json.loads(table.read_text())["cells"] if distributed.is_main() else None,
            "timings": sorted(k for k in runner.timings if k != "total")}


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    torch.set_num_threads(1)
    distributed.init()
    result = {"evaluate": evaluate_scenario, "aaa": aaa_scenario, "trainers": trainers_scenario,
              "reproduce": reproduce_scenario}[scenario](out)
    result["world_size"] = distributed.world().size
    if distributed.is_main():
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
