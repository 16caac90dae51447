"""Accuracy as a function of attack strength: PuVAE's eps sweep against the detector pipeline,
S2SNet's strength curves in three threat models, and the input-noise sweep.

Threat-model labels of the eps sweep:

* *oblivious*: crafted on the bare classifier, then evaluated on the whole pipeline (the seed
  paper's setting: the attacker does not know the purifier or the detector);
* *gray-box*: white-box through the purifier (PuVAE's arg-min as a fixed choice per step, i.e.
  BPDA for the selection; EOT over sampling where the pipeline samples), detector unknown;
* *adaptive*: white-box through purifier and detector (``detector-pgd``: success only for
  inputs misclassified and not rejected), as the worst case over every attack before it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...attacks import EOT, fgsm, run_attack
from ...defenses.base import Shielded, predict
from ...defenses.s2snet import InputNoise, S2SNet
from ...eval.harness import AttackSpec, evaluate
from ...records import Accuracy
from ...io import write_text_atomic
from ...threat import ThreatModel
from .base import (AnalysisContext, AnalysisResult, accuracy_dict, accuracy_of, attack_at, classifier_key,
                   data_label, fmt_accuracy, pipeline_key, pyplot, save_png, shield_key)

logger = logging.getLogger(__name__)
THREAT_MODELS = ("white-box", "white-box*", "gray-box")


@dataclass(frozen=True)
class WorstCase:
    """An attack's lowest accuracy over the sweep, and the per-example worst case over every eps."""

    eps: float
    accuracy: Accuracy
    all_eps: Accuracy


@dataclass(frozen=True)
class EpsSweepResult(AnalysisResult):
    clean: Accuracy
    worst: dict[str, WorstCase]  # by attack label, and WORST (the worst case over attacks)


@dataclass(frozen=True)
class CurvePoint:
    attack: str
    strength: float
    pipeline: str
    threat_model: str
    dissimilarity: float
    accuracy: Accuracy


@dataclass(frozen=True)
class StrengthCurvesResult(AnalysisResult):
    n: int
    points: tuple[CurvePoint, ...]


@dataclass(frozen=True)
class NoisePoint:
    kind: str
    scale: float
    clean: Accuracy
    fgsm: Accuracy


@dataclass(frozen=True)
class NoiseSweepResult(AnalysisResult):
    n: int
    points: tuple[NoisePoint, ...]
    no_noise_clean: Accuracy
    no_noise_fgsm: Accuracy
    classifier_alone_clean: Accuracy


def _describe(d: dict) -> str:
    """An attack of the sweep as text, its step size written as a multiple of eps when it is one."""
    params = dict(d.get("params") or {})
    factor = params.pop("step_size_factor", None)
    title = AttackSpec(params=params, **{k: v for k, v in d.items() if k != "params"}).title
    return title + (f" step_size={factor}*eps" if factor is not None else "")


def _eps_grid(value) -> list[float]:
    if isinstance(value, dict):
        start, stop, num = float(value["start"]), float(value["stop"]), int(value["num"])
        return [round(start + (stop - start) * i / (num - 1), 4) for i in range(num)]
    return [float(v) for v in value]


def _flags_acc(flags: str) -> Accuracy:
    return Accuracy(flags.count("1"), len(flags))


def eps_sweep(figure: dict, ctx: AnalysisContext) -> EpsSweepResult:
    """Accuracy of one pipeline vs. L-inf eps for each attack (cascade) of ``figure["attacks"]``,
    the worst-case eps per attack, and the worst case over attacks per eps."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    shield, classifier = figure["shield"], figure["classifier"]
    eps_values = _eps_grid(figure["eps"])
    n = int(figure.get("n", 200))
    attacks: dict[str, list[dict]] = figure["attacks"]
    spec = {"model": pipeline_key(zoo, shield, classifier), "eps": eps_values, "n": n,
            "attacks": attacks, "seed": config.seed}

    def compute() -> dict:
        model = zoo.shield_pipeline(shield, classifier)
        test = data.test.subset(n, seed=config.seed)
        curves: dict[str, list[dict]] = {}
        clean = None
        for label, cascade in attacks.items():
            rows = []
            for eps in eps_values:
                torch.manual_seed(config.seed)
                record = evaluate(model, test.images, test.labels, [attack_at(a, eps) for a in cascade],
                                  ThreatModel("Linf", eps), batch_size=config.batch_size,
                                  seed=config.seed, progress=False)
                clean = record.clean.to_dict() | {"clean_reject_rate": record.clean_reject_rate}
                rows.append({"eps": eps, "robust": record.robust.to_dict(), "flags": record.robust_flags,
                             "after": [{"attack": a.name, "accuracy": a.accuracy_after.to_dict()}
                                       for a in record.attacks]})
                logger.info("sweep %s eps=%.3f: %s", label, eps, record.robust.format())
            curves[label] = rows
        return {"clean": clean, "curves": curves, "eps": eps_values, "n": n,
                "test_subset_seed": config.seed}

    record = ctx.records.get(figure.get("record", "eps_sweep"), spec, compute)
    files = _render_sweep(data_label(config, data.test), figure, record, out)
    worst = {label: WorstCase(s["worst_eps"], accuracy_of(s["worst"]), accuracy_of(s["all_eps"]))
             for label, s in sweep_summary(record)["attacks"].items()}
    return EpsSweepResult(record=record, files=files, clean=accuracy_of(record["clean"]), worst=worst)


def sweep_summary(record: dict) -> dict:
    """Per attack: worst-case eps (lowest accuracy) and the per-example worst case over all eps;
    per eps: the per-example worst case over all attacks."""
    summary: dict = {"attacks": {}, "worst_over_attacks": []}
    for label, rows in record["curves"].items():
        worst = min(rows, key=lambda r: (r["robust"]["correct"], -r["eps"]))
        union = "".join("1" if all(r["flags"][i] == "1" for r in rows) else "0"
                        for i in range(len(rows[0]["flags"])))
        summary["attacks"][label] = {"worst_eps": worst["eps"], "worst": worst["robust"],
                                     "all_eps": _flags_acc(union).to_dict()}
    for i, eps in enumerate(record["eps"]):
        flags = [rows[i]["flags"] for rows in record["curves"].values()]
        both = "".join("1" if all(f[j] == "1" for f in flags) else "0" for j in range(len(flags[0])))
        summary["worst_over_attacks"].append({"eps": eps, "robust": _flags_acc(both).to_dict(),
                                              "flags": both})
    rows = summary["worst_over_attacks"]
    worst = min(rows, key=lambda r: (r["robust"]["correct"], -r["eps"]))
    union = "".join("1" if all(r["flags"][i] == "1" for r in rows) else "0"
                    for i in range(len(rows[0]["flags"])))
    summary["attacks"][WORST] = {"worst_eps": worst["eps"], "worst": worst["robust"],
                                 "all_eps": _flags_acc(union).to_dict()}
    return summary


WORST = "worst case over attacks (per example)"


def _render_sweep(dataset: str, figure: dict, record: dict, out: Path) -> tuple[Path, Path]:
    summary = sweep_summary(record)
    labels = list(record["curves"])
    eps = record["eps"]
    clean = record["clean"]
    lines = [f"# eps sweep: {figure.get('title', figure['shield'])}", "",
             f"Pipeline: shield `{figure['shield']}` + classifier `{figure['classifier']}`; "
             f"{dataset}, n = {record['n']} test images (seeded subset), L-inf, "
             f"{len(eps)} eps values in [{eps[0]}, {eps[-1]}]. Clean accuracy "
             f"{fmt_accuracy(clean)} (a reject counts as an error; clean reject rate "
             f"{100 * (clean.get('clean_reject_rate') or 0):.1f}%). Cells: accuracy % [Wilson 95%]; an "
             "adversarial input counts as handled if it gets its true label or is rejected.", ""]
    if figure.get("note"):
        lines += [figure["note"].strip(), ""]
    lines += ["Attacks (each row of the sweep is its own cascade; later attacks only see what "
              "survived the earlier ones):", ""]
    for label, cascade in figure["attacks"].items():
        lines.append(f"- **{label}**: " + "; ".join(_describe(a) for a in cascade))
    lines += ["", "## Worst case per attack", "",
              "| attack | worst-case eps | accuracy there | per example, worst over all eps |",
              "|---|---|---|---|"]
    for label in labels + [WORST]:
        s = summary["attacks"][label]
        lines.append(f"| {label} | {s['worst_eps']} | {fmt_accuracy(s['worst'])} | {fmt_accuracy(s['all_eps'])} |")
    adaptive = [lab for lab in labels if lab.startswith("adaptive")]
    oblivious = [lab for lab in labels if "oblivious" in lab]
    if adaptive and oblivious:
        ok = [all(record["curves"][adaptive[0]][i]["robust"]["correct"]
                  <= record["curves"][o][i]["robust"]["correct"] for o in oblivious)
              for i in range(len(eps))]
        lines += ["", f"Adaptive cascade at least as strong as every oblivious attack: at "
                  f"{sum(ok)} of {len(eps)} eps values"
                  + ("" if all(ok) else " (where not, the per-example worst case over attacks, "
                     "last column, is the number to use)") + "."]
    lines += ["", "## Accuracy per eps", "",
              "| eps | " + " | ".join(labels) + " | worst over attacks |",
              "|---|" + "---|" * (len(labels) + 1)]
    for i, e in enumerate(eps):
        cells = [fmt_accuracy(record["curves"][lab][i]["robust"]) for lab in labels]
        worst = fmt_accuracy(summary['worst_over_attacks'][i]['robust'])
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {worst} |")
    table = write_text_atomic(out / figure.get("table", "eps_sweep.md"), "\n".join(lines) + "\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label in labels:
        acc = [100 * r["robust"]["accuracy"] for r in record["curves"][label]]
        (line,) = ax.plot(eps, acc, marker=".", label=label)
        s = summary["attacks"][label]
        ax.plot([s["worst_eps"]], [100 * s["worst"]["accuracy"]], marker="*", markersize=14,
                color=line.get_color(), markeredgecolor="black")
    worst_curve = [100 * r["robust"]["accuracy"] for r in summary["worst_over_attacks"]]
    ax.plot(eps, worst_curve, color="black", linestyle="--", label=WORST)
    s = summary["attacks"][WORST]
    ax.plot([s["worst_eps"]], [100 * s["worst"]["accuracy"]], marker="*", markersize=14,
            color="black")
    ax.axhline(100 * clean["accuracy"], color="grey", linestyle=":", label="clean (no attack)")
    ax.set_xlabel("L-inf eps")
    ax.set_ylabel("accuracy % (true label or reject)")
    ax.set_title(f"{dataset}: {figure.get('title', figure['shield'])}, n={record['n']} "
                 "(star = worst eps)", fontsize=8)
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return table, save_png(fig, out / figure.get("file", "eps_sweep.png"))


def _correct_subset(test, classifier: nn.Module, n: int, seed: int, device: str):
    """The first ``n`` test images (seeded order) that ``classifier`` labels correctly."""
    pool = test.subset(min(len(test), 2 * n + 100), seed=seed)
    ok = predict(classifier, pool.images) == pool.labels
    x, y = pool.images[ok][:n], pool.labels[ok][:n]
    return x.to(device), y.to(device), int(ok[: len(ok)].sum())


def _dissimilarity(x: torch.Tensor, x_adv: torch.Tensor) -> float:
    """Mean normalized L2 dissimilarity ``||x - x_adv|| / ||x||`` (S2SNet's strength axis)."""
    return float(((x_adv - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def _craft(attack: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, strength: float,
           settings: dict) -> torch.Tensor:
    unused = torch.Generator().manual_seed(0)  # none of the three draws random numbers
    if attack == "fgsm":
        return run_attack("fgsm", model, x, y, ThreatModel("Linf", strength), unused)
    if attack == "bim":
        return run_attack("bim", model, x, y, ThreatModel("Linf", strength), unused,
                          steps=int(settings.get("steps", 10)))
    if attack == "cw":
        return run_attack("cw-l2", model, x, y, ThreatModel("L2", strength), unused,
                          c=float(settings.get("c", 10.0)), steps=int(settings.get("steps", 100)),
                          lr=float(settings.get("lr", 0.05)))
    raise ValueError(f"s2s-curves knows fgsm, bim and cw, not {attack!r}")


def _strength_label(attack: str) -> str:
    return "L-inf eps" if attack in ("fgsm", "bim") else "L2 budget"


def strength_curves(figure: dict, ctx: AnalysisContext) -> StrengthCurvesResult:
    """White-box (craft and evaluate on F(S(.))), white-box* (craft on F, evaluate F(S(.))) and
    gray-box (craft on F(S(.)), evaluate F) accuracy on inputs F originally classified right."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    name = figure.get("name", "s2s_curves")
    clf_name, shields = figure["classifier"], dict(figure["shields"])
    attacks = {k: dict(v) for k, v in figure["attacks"].items()}
    n = int(figure.get("n", 200))
    spec = {"classifier": classifier_key(zoo, clf_name), "shields": {k: shield_key(zoo, v)
            for k, v in shields.items()}, "attacks": attacks, "n": n, "seed": config.seed}

    def compute() -> dict:
        classifier = zoo.classifier(clf_name)
        x, y, _ = _correct_subset(data.test, classifier, n, config.seed + 11, zoo.device)
        pipes = {label: Shielded(zoo.shield(s), classifier).eval() for label, s in shields.items()}
        rows: list[dict] = []
        for attack, settings in attacks.items():
            for strength in settings["strengths"]:
                x_f = _craft(attack, classifier, x, y, strength, settings)
                base = {"attack": attack, "strength": strength}
                rows.append({**base, "pipeline": "undefended", "threat_model": "white-box",
                             "dissimilarity": _dissimilarity(x, x_f),
                             "accuracy": accuracy_dict(predict(classifier, x_f) == y)})
                for label, pipe in pipes.items():
                    rows.append({**base, "pipeline": label, "threat_model": "white-box*",
                                 "dissimilarity": _dissimilarity(x, x_f),
                                 "accuracy": accuracy_dict(predict(pipe, x_f) == y)})
                    x_s = _craft(attack, pipe, x, y, strength, settings)
                    rows.append({**base, "pipeline": label, "threat_model": "white-box",
                                 "dissimilarity": _dissimilarity(x, x_s),
                                 "accuracy": accuracy_dict(predict(pipe, x_s) == y)})
                    rows.append({**base, "pipeline": label, "threat_model": "gray-box",
                                 "dissimilarity": _dissimilarity(x, x_s),
                                 "accuracy": accuracy_dict(predict(classifier, x_s) == y)})
                logger.info("s2s-curves %s %.3g done", attack, strength)
        clean = {label: accuracy_dict(predict(pipe, x) == y) for label, pipe in pipes.items()}
        return {"n": int(len(y)), "rows": rows, "clean_on_subset": clean}

    record = ctx.records.get(name, spec, compute)
    files = _render_curves(record, attacks, list(shields), out, name)
    points = tuple(CurvePoint(r["attack"], r["strength"], r["pipeline"], r["threat_model"],
                              r["dissimilarity"], accuracy_of(r["accuracy"])) for r in record["rows"])
    return StrengthCurvesResult(record=record, files=files, n=record["n"], points=points)


def _render_curves(record: dict, attacks: dict, labels: list[str], out: Path,
                   name: str) -> tuple[Path, ...]:
    plt = pyplot()
    files = []
    rows = record["rows"]
    lines = [f"# S2SNet: accuracy vs. strength (n = {record['n']} test images the classifier "
             "originally classified correctly; accuracy % [Wilson 95%]; d = mean normalized L2 "
             "dissimilarity ||x - x_adv|| / ||x||)", "",
             "Threat models: white-box = crafted and evaluated on F(S(.)); white-box* = crafted on "
             "F alone, evaluated on F(S(.)) (BPDA with the identity); gray-box = crafted on "
             "F(S(.)), evaluated on F alone. `undefended` = F attacked and evaluated alone.", "",
             "Clean accuracy of each pipeline on this subset: " + ", ".join(
                 f"{k} {fmt_accuracy(v)}" for k, v in record["clean_on_subset"].items()), ""]
    for attack, settings in attacks.items():
        strengths = settings["strengths"]
        extra = {k: v for k, v in settings.items() if k != "strengths"}
        lines += [f"## {attack.upper()} ({_strength_label(attack)}; settings {extra or 'default'})", "",
                  "| pipeline | threat model | " + " | ".join(str(s) for s in strengths) + " |",
                  "|---|---|" + "---|" * len(strengths)]
        combos = [("undefended", "white-box")] + [(lb, tm) for lb in labels for tm in THREAT_MODELS]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
        for pipeline, tm in combos:
            pts = sorted((r for r in rows if r["attack"] == attack and r["pipeline"] == pipeline
                          and r["threat_model"] == tm), key=lambda r: r["strength"])
            if not pts:
                continue
            lines.append(f"| {pipeline} | {tm} | " + " | ".join(
                f"{fmt_accuracy(r['accuracy'])} (d={r['dissimilarity']:.3f})" for r in pts) + " |")
            xs = [r["dissimilarity"] for r in pts]
            ys = [100 * r["accuracy"]["accuracy"] for r in pts]
            err = [[100 * (r["accuracy"]["accuracy"] - r["accuracy"]["ci95"][0]) for r in pts],
                   [100 * (r["accuracy"]["ci95"][1] - r["accuracy"]["accuracy"]) for r in pts]]
            panels = range(3) if pipeline == "undefended" else [THREAT_MODELS.index(tm)]
            for p in panels:
                style = dict(color="black", ls="--") if pipeline == "undefended" else {}
                axes[p].errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, label=pipeline, **style)
        for p, tm in enumerate(THREAT_MODELS):
            axes[p].set_title(f"{attack.upper()}, {tm}", fontsize=9)
            axes[p].set_xlabel("normalized L2 dissimilarity ||x-x_adv||/||x||", fontsize=8)
            axes[p].grid(alpha=0.3)
        axes[0].set_ylabel(f"accuracy % (n={record['n']}, Wilson 95%)", fontsize=8)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        files.append(save_png(fig, out / f"{name}_{attack}.png"))
        lines.append("")
    return (write_text_atomic(out / f"{name}.md", "\n".join(lines)), *files)


def noise_sweep(figure: dict, ctx: AnalysisContext) -> NoiseSweepResult:
    """Clean accuracy of F(S(noise(x))) for each noise kind and scale, and white-box FGSM
    accuracy through the noisy pipeline with EOT."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    name = figure.get("name", "s2s_noise")
    clf_name, shield = figure["classifier"], figure["shield"]
    kinds, scales = list(figure.get("kinds", ["gaussian", "uniform", "sign"])), list(figure["scales"])
    n, eps, samples = int(figure.get("n", 500)), float(figure.get("fgsm_eps", 0.1)), int(figure.get("eot", 8))
    spec = {"classifier": classifier_key(zoo, clf_name), "shield": shield_key(zoo, shield),
            "kinds": kinds, "scales": scales, "n": n, "fgsm_eps": eps, "eot": samples,
            "seed": config.seed}

    def compute() -> dict:
        classifier = zoo.classifier(clf_name)
        autoencoder = zoo.shield(shield).autoencoder
        test = data.test.subset(n, seed=config.seed + 13)
        x, y = test.images.to(zoo.device), test.labels.to(zoo.device)
        rows = []
        for kind in kinds:
            for s in scales:
                torch.manual_seed(config.seed)  # the noise layers draw from the global RNG
                pipe = Shielded(S2SNet(autoencoder, InputNoise(kind, s)), classifier).eval()
                clean = predict(pipe, x) == y
                x_adv = fgsm(EOT(pipe, samples), x, y, eps=eps)
                rows.append({"kind": kind, "s": s, "clean": accuracy_dict(clean),
                             "fgsm": accuracy_dict(predict(pipe, x_adv) == y)})
        torch.manual_seed(config.seed)
        plain = Shielded(S2SNet(autoencoder), classifier).eval()
        x_adv = fgsm(plain, x, y, eps=eps)
        return {"n": n, "rows": rows, "no_noise": {"clean": accuracy_dict(predict(plain, x) == y),
                                                   "fgsm": accuracy_dict(predict(plain, x_adv) == y)},
                "classifier_alone_clean": accuracy_dict(predict(classifier, x) == y)}

    r = ctx.records.get(name, spec, compute)
    lines = [f"# S2SNet input-noise layers (n = {r['n']} test images; accuracy % [Wilson 95%])", "",
             f"Pipeline F(S(noise(x))) with S = shield `{shield}`, F = `{clf_name}`. FGSM: white-box, "
             f"L-inf eps {eps}, crafted through the whole noisy pipeline with EOT over {samples} draws "
             "and evaluated on one fresh draw.", "",
             f"Classifier alone, clean: {fmt_accuracy(r['classifier_alone_clean'])}. S2SNet without noise: "
             f"clean {fmt_accuracy(r['no_noise']['clean'])}, FGSM {fmt_accuracy(r['no_noise']['fgsm'])}.", "",
             "| noise | s | clean | clean-accuracy cost (points) | FGSM (EOT) |", "|---|---|---|---|---|"]
    base = r["no_noise"]["clean"]["accuracy"]
    for row in r["rows"]:
        lines.append(f"| {row['kind']} | {row['s']} | {fmt_accuracy(row['clean'])} | "
                     f"{100 * (base - row['clean']['accuracy']):.1f} | {fmt_accuracy(row['fgsm'])} |")
    table = write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for kind in kinds:
        pts = [row for row in r["rows"] if row["kind"] == kind]
        for ax, key in zip(axes, ("clean", "fgsm")):
            ax.errorbar([p["s"] for p in pts], [100 * p[key]["accuracy"] for p in pts],
                        yerr=[[100 * (p[key]["accuracy"] - p[key]["ci95"][0]) for p in pts],
                              [100 * (p[key]["ci95"][1] - p[key]["accuracy"]) for p in pts]],
                        marker="o", ms=3, capsize=2, label=kind)
    axes[0].set_title(f"clean accuracy (n={r['n']})", fontsize=9)
    axes[1].set_title(f"white-box FGSM eps={eps}, EOT-{samples}", fontsize=9)
    for ax in axes:
        ax.set_xlabel("noise scale s", fontsize=8)
        ax.set_ylabel("accuracy %", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    picture = save_png(fig, out / f"{name}.png")
    points = tuple(NoisePoint(p["kind"], p["s"], accuracy_of(p["clean"]), accuracy_of(p["fgsm"]))
                   for p in r["rows"])
    return NoiseSweepResult(record=r, files=(table, picture), n=r["n"], points=points,
                            no_noise_clean=accuracy_of(r["no_noise"]["clean"]),
                            no_noise_fgsm=accuracy_of(r["no_noise"]["fgsm"]),
                            classifier_alone_clean=accuracy_of(r["classifier_alone_clean"]))
