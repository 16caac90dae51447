"""Every key a shipped target hashes (artifacts, records' model specs, shield cards), for the test
that adding a config field at its default leaves them unchanged (tests/fixtures/config_keys.json,
computed at 87088e0 before the training schedules were added; the quick keys of aaa-mnist and
demo were computed again when issue 26 retuned their recipe, which meant to retrain them; the
keys of aaa-fmnist's 4x candidates were added when they were, every earlier key unchanged; the
quick keys of aaa-ensemble-mnist and corruption-mnist were computed again when they moved to
aaa-mnist's issue-26 recipe).

Run ``python tests/config_keys.py > tests/fixtures/config_keys.json`` to regenerate; only a
change that means to retrain or re-measure should.
"""

from __future__ import annotations

import json
import sys
import tempfile

from aeshield.defenses.adversarial_training import AdversarialTrainingConfig
from aeshield.defenses.registry import config_to_dict, get_defense, list_defenses
from aeshield.experiments.config import list_targets, load_config
from aeshield.experiments.methods import from_spec, get_method
from aeshield.experiments.zoo import ModelZoo
from aeshield.records import config_hash
from aeshield.store import ArtifactStore


def keys() -> dict[str, str]:
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in list_targets():
            for profile in ("quick", "paper"):
                for smoke in (False, True):
                    try:
                        config = load_config(target, profile, smoke=smoke)
                    except ValueError:
                        continue  # a target without this profile
                    name = f"{target}/{profile}{'-smoke' if smoke else ''}"
                    zoo = ModelZoo(config, None, ArtifactStore(tmp, "d" * 64))
                    for c in config.classifiers:
                        out[f"{name}/classifier/{c}"] = zoo.classifier_artifact(c)[1]
                        if config.adversarial_training is not None:
                            out[f"{name}/adv-trained/{c}"] = zoo.adversarially_trained_artifact(c)[1]
                    if config.adversarial_training is not None:
                        at = from_spec(AdversarialTrainingConfig, config.adversarial_training, seed=config.seed)
                        out[f"{name}/config/adversarial_training"] = config_hash(config_to_dict(at))
                    for s, spec in config.shields.items():
                        out[f"{name}/shield/{s}"] = zoo.shield_artifact(s)[1]
                        method = get_method(spec.method)
                        if method.config is not None:
                            out[f"{name}/card/{s}"] = config_hash(method.card(
                                spec, config.seed, config.dataset, list(method.depends_on(spec))))
                            out[f"{name}/config/{s}"] = config_hash(config_to_dict(method.config(spec, config.seed)))
                    for row in config.rows:
                        if row.kind == "shield" and row.shield is None:
                            continue  # chosen by a selection at run time
                        for c in config.classifiers:
                            out[f"{name}/record-model/{row.label}/{c}"] = config_hash(zoo.model_key(row, c))
    # A default config of every defense, as ``train_shield`` keys its checkpoints.
    for defense in list_defenses():
        out[f"default-config/{defense}"] = config_hash(config_to_dict(
            get_defense(defense).config(**({"architecture": "x"} if defense == "adversarial_training" else {}))))
    return out


if __name__ == "__main__":
    json.dump(keys(), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
