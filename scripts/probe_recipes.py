"""The recipe probes of issue 26's retunes of the quick profiles of aaa-mnist, aaa-fmnist and
aaa-cifar10: one AAA shield or one Madry AT run on the target's whole training split,
scored on the first 500 **validation** images (training images no model trained on; never
test images) under PGD-40 (step 0.01) x 5 restarts at the target's eps, behind each of the
target's classifiers (AAA) or the trained classifier (AT).

    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py aaa '{"schedule": "pgd", "attack_steps": 2,
        "step_size": 0.15, "epochs": 2, "batch_size": 32, "lr": 0.01, "cosine_lr": true}'
    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py at '{"classifier": "B", "schedule": "pgd",
        "attack_steps": 3, "step_size": 0.1, "eps_ramp_steps": 500, "epochs": 2, "batch_size": 32,
        "lr": 0.003, "cosine_lr": true}'
    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py aaa '{"target": "aaa-fmnist",
        "against": "N", "eps": 0.2, "lam": 0.4, "attack_steps": 2, "step_size": 0.1, ...}'
    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py aaa '{"against": "A", "query_only": "A",
        "query_method": "surrogate", "surrogate": "mnist-b", "attack_steps": 2, "step_size": 0.15, ...}'
    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py shipped '{"target": "aaa-fmnist",
        "shield": "xent+mse-lam0.4"}'
    OMP_NUM_THREADS=2 .venv/bin/python scripts/probe_recipes.py aaa '{"target": "aaa-cifar10",
        "against": "DEF", "ae": "unet-quick", "eps": 0.0314, "attack_steps": 2, "step_size": 0.0157,
        ..., "score": {"steps": 20, "step_size": 0.00784, "restarts": 1}}'

The JSON holds ``AAAConfig`` / ``AdversarialTrainingConfig`` fields (plus ``ae``: the
autoencoder, ``against``: e.g. "AB", ``query_only``: those of ``against`` behind ``QueryOnly``
(``query_output``: "probs" or "label"), ``classifier``: whose AT, ``train_n``: a prefix of the
split, ``target``: aaa-mnist (default) or another target whose classifiers to use,
``classifiers``: changed training recipes of some of them, e.g. ``{"D": {"epochs": 8}}``,
``score``: the scoring PGD's ``steps``, ``step_size``, ``restarts`` instead of 40, 0.01, 5,
``score_natural``: also score the bare classifiers); ``shipped``
scores a shield of the target's quick profile as the runner loads it (``shield``: its name).
Prints one JSON line. The classifiers are the target's quick ones, read from the shipped
weights or the artifact cache (run ``aeshield reproduce aaa-mnist`` once to train A). What it
measured is in docs/dev/fast-training.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

from aeshield.attacks.gradient import pgd
from aeshield.data import load_dataset
from aeshield.defenses.aaa import AAAConfig, train_aaa
from aeshield.defenses.adversarial_training import AdversarialTrainingConfig, adversarial_training
from aeshield.defenses.base import Shielded
from aeshield.experiments.config import load_config
from aeshield.experiments.runner import Runner
from aeshield.models import create_model
from aeshield.models.query import QueryOnly


def score(model, x, y, eps: float, attack: dict) -> tuple[float, float]:
    """Clean and PGD accuracy (%) on ``(x, y)``; ``attack``: PGD's steps, step_size, restarts."""
    model.eval()
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    x_adv = pgd(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0), **attack)
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean())
    return round(100 * clean, 1), round(100 * robust, 1)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    n_val = int(sys.argv[3]) if len(sys.argv) > 3 else 500
    out = {"kind": kind, "spec": dict(spec)}
    config = load_config(spec.pop("target", "aaa-mnist"), "quick")
    # ``classifiers``: changed training recipes of some of the target's classifiers, e.g.
    # {"D": {"epochs": 8, "train_limit": null}} (trained into the artifact cache as such).
    for name, changes in spec.pop("classifiers", {}).items():
        config.classifiers[name] = dataclasses.replace(config.classifiers[name], **changes)
    eps = config.adversarial_training.eps
    # The scoring attack: PGD-40 (step 0.01) x 5 unless the spec says otherwise (aaa-cifar10's
    # probes: the target's own PGD-20, step 2/255).
    attack = {"steps": 40, "step_size": 0.01, "restarts": 5} | spec.pop("score", {})
    out["score"] = attack
    train, val = load_dataset(config.dataset, "train"), load_dataset(config.dataset, "val")
    xv, yv = val.images[:n_val], val.labels[:n_val]
    runner = Runner(config, progress=False)
    classifiers = {k: runner.zoo.classifier(k).eval() for k in config.classifiers}
    if kind == "shipped":
        shield = runner.zoo.shield(spec["shield"]).eval()
        for k in classifiers:
            out[k] = score(Shielded(shield, classifiers[k]).eval(), xv, yv, eps, attack)
        print(json.dumps(out), flush=True)
        return
    limit = spec.pop("train_n", None)
    x, y = (train.images, train.labels) if limit is None else (train.images[:limit], train.labels[:limit])
    out["train_n"] = int(x.shape[0])
    start = time.perf_counter()
    if kind == "aaa":
        against = spec.pop("against", "AB")
        # Issue 28: these of ``against`` answer only queries (``query_method`` etc. in the spec).
        hidden = {k: QueryOnly(classifiers[k], output=spec.pop("query_output", "probs"))
                  for k in spec.pop("query_only", "")}
        torch.manual_seed(spec.get("seed", 0))
        shield = create_model(spec.pop("ae", "conv-ae"))
        natural = {k: score(classifiers[k], xv, yv, eps, attack) for k in classifiers} if spec.pop(
            "score_natural", False) else None
        result = train_aaa(shield, [hidden.get(k, classifiers[k]) for k in against], x, y, AAAConfig(**spec),
                           progress=False)
        out["train_s"] = round(time.perf_counter() - start, 1)
        if hidden:
            out["queries"] = {k: int(q.spent) for k, q in hidden.items()}
        out["guard"] = [{k: round(v, 3) for k, v in h.items() if k.startswith("guard")} for h in result.history]
        for k in classifiers:
            out[k] = score(Shielded(shield.eval(), classifiers[k]).eval(), xv, yv, eps, attack)
        if natural:
            out["natural"] = natural
    else:
        which = spec.pop("classifier")
        model = create_model(runner.config.classifiers[which].model)
        model.load_state_dict(classifiers[which].state_dict())
        result = adversarial_training(model, x, y, AdversarialTrainingConfig(**spec), progress=False)
        out["train_s"] = round(time.perf_counter() - start, 1)
        out["history"] = [{k: round(v, 3) if isinstance(v, float) else v for k, v in h.items()}
                          for h in result.history]
        out[which] = score(model, xv, yv, eps, attack)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
