"""Robustness audit: attack any (shielded) classifier as hard as the field knows how, check the
evaluation for gradient masking, and write the report.

``audit(model, images, labels, threat)`` runs one cascade (``evaluate``, per-example worst
case, checkpointed so that a crash resumes where it stopped) of

1. PGD on the cross-entropy and on the margin (CW) loss, with restarts (Madry et al. 2018);
2. APGD-CE, APGD-T, FAB-T (Croce and Hein 2020) from the reference AutoAttack code;
3. CW-L2 (Carlini and Wagner 2017) for L2 threat models;
4. BPDA variants when the model is ``Shielded`` (Athalye, Carlini and Wagner 2018);
5. component-aware adaptive attacks that the pipeline exposes: reconstruction-augmented PGD,
   latent-space PGD when the purifier has ``encode``, and when there is a detector two
   detector-aware PGDs, a weighted sum of the two goals and orthogonal PGD (Tramer et al. 2020,
   "On Adaptive Attacks to Adversarial Example Defenses"; Bryniarski et al. 2022);
6. last, the black-box and transfer attacks: Square (Andriushchenko et al. 2020), transfer
   from the bare classifier and from an independently trained surrogate,

and, at its stage, every other registered attack that declares an audit hook
(``aeshield.attacks.AuditHook``),

with every gradient attack run through EOT (Athalye et al. 2018) when the pipeline turns out
to be random (the same input twice gives different logits). Then it runs the sanity checks of
``aeshield.eval.sanity`` on a subset, draws accuracy-vs-eps and accuracy-vs-steps plots, and
writes ``audit.md`` and ``audit.json`` (with the manifest: settings, seed, versions, data
hashes) atomically to ``out``.

Threat model: white-box and black-box adversaries within ``ThreatModel(norm, eps)``; an
example counts as robust if every attack leaves it correctly classified or rejected.

One module per job: ``budget`` (how hard), ``battery`` (which attacks), ``checks`` (the sanity
checks), ``run`` (``audit`` itself), ``report`` (``audit.json``, ``audit.md``) and ``plots``.
"""

from ...attacks.adaptive import detector_pgd  # re-exported: importers used it from here
from .battery import BLACKBOX_LABELS, build_battery, describe_model, reference_attack
from .budget import BUDGETS, AuditBudget, get_budget, step_size, with_budget
from .report import FORMAT, PROTOCOL, AuditReport, measures_as_current_protocol
from .run import audit

__all__ = [
    "BLACKBOX_LABELS",
    "BUDGETS",
    "FORMAT",
    "PROTOCOL",
    "AuditBudget",
    "AuditReport",
    "audit",
    "build_battery",
    "describe_model",
    "detector_pgd",
    "get_budget",
    "measures_as_current_protocol",
    "reference_attack",
    "step_size",
    "with_budget",
]
