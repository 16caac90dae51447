"""PuVAE / MagNet analyses for the ``puvae-*`` targets: eps sweep against the detector,
detector false-positive rates and the RMSE gap, the sampled mode under EOT, a Figure-6-like
picture, and the seed paper's table layout (rows = attacks, columns = defenses).

Every analysis measures through ``Runner.cached_record`` and draws only from what it wrote.
Threat-model labels used throughout:

* *oblivious*: crafted on the bare classifier, then evaluated on the whole pipeline (the seed
  paper's setting: the attacker does not know the purifier or the detector);
* *gray-box*: white-box through the purifier (PuVAE's arg-min as a fixed choice per step, i.e.
  BPDA for the selection; EOT over sampling where the pipeline samples), detector unknown;
* *adaptive*: white-box through purifier and detector (``detector-pgd``: success only for
  inputs misclassified and not rejected), as the worst case over every attack before it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..eval.harness import AttackSpec, evaluate
from ..records import Accuracy, EvalRecord
from ..io import write_text_atomic
from ..threat import ThreatModel
from .config import spec_dict
from .methods import get_method

if TYPE_CHECKING:
    from .runner import Runner

logger = logging.getLogger(__name__)


# ---- helpers ---------------------------------------------------------------------------------
def _pipeline(runner: "Runner", shield: str, classifier: str):
    spec = runner.config.shields[shield]
    return get_method(spec.method).pipeline(runner, spec, runner.shield(shield), classifier)


def _model_key(runner: "Runner", shield: str, classifier: str) -> dict:
    """What an analysis record depends on: the specs and the weight files themselves (so a
    record measured on other weights, e.g. a classifier retrained elsewhere, is recomputed)."""
    runner.shield(shield), runner.classifier(classifier)  # load, so their files are hashed
    return {"shield": spec_dict(runner.config.shields[shield]), "artifact": runner.shield_artifact(shield)[1],
            "classifier": asdict(runner.config.classifiers[classifier]),
            "weights": runner.weight_hashes([f"shield-{shield}", classifier])}


def _attack(d: dict, eps: float) -> AttackSpec:
    """An AttackSpec from a config dict; ``step_size_factor`` sets ``step_size = factor * eps``."""
    d = dict(d)
    params = dict(d.pop("params", {}) or {})
    factor = params.pop("step_size_factor", None)
    if factor is not None:
        params["step_size"] = float(factor) * eps
    return AttackSpec(params=params, **d)


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


def _acc(d: dict) -> Accuracy:
    return Accuracy(d["correct"], d["n"])


def _flags_acc(flags: str) -> Accuracy:
    return Accuracy(flags.count("1"), len(flags))


def _data_label(runner: "Runner") -> str:
    """The dataset as every output must name it: measurements on the JPEG stand-in say so."""
    source = runner.test.source
    return source if "stand-in" in source else runner.config.dataset


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- eps sweep --------------------------------------------------------------------------------
def eps_sweep(runner: "Runner", figure: dict, out: Path) -> dict:
    """Accuracy of one pipeline vs. L-inf eps for each attack (cascade) of ``figure["attacks"]``,
    the worst-case eps per attack, and the worst case over attacks per eps."""
    shield, classifier = figure["shield"], figure["classifier"]
    eps_values = _eps_grid(figure["eps"])
    n = int(figure.get("n", 200))
    attacks: dict[str, list[dict]] = figure["attacks"]
    spec = {"model": _model_key(runner, shield, classifier), "eps": eps_values, "n": n,
            "attacks": attacks, "seed": runner.config.seed}

    def compute() -> dict:
        model = _pipeline(runner, shield, classifier)
        test = runner.test.subset(n, seed=runner.config.seed)
        curves: dict[str, list[dict]] = {}
        clean = None
        for label, cascade in attacks.items():
            rows = []
            for eps in eps_values:
                torch.manual_seed(runner.config.seed)
                record = evaluate(model, test.images, test.labels, [_attack(a, eps) for a in cascade],
                                  ThreatModel("Linf", eps), batch_size=runner.config.batch_size,
                                  seed=runner.config.seed, progress=False)
                clean = record.clean.to_dict() | {"clean_reject_rate": record.clean_reject_rate}
                rows.append({"eps": eps, "robust": record.robust.to_dict(), "flags": record.robust_flags,
                             "after": [{"attack": a.name, "accuracy": a.accuracy_after.to_dict()}
                                       for a in record.attacks]})
                logger.info("sweep %s eps=%.3f: %s", label, eps, record.robust.format())
            curves[label] = rows
        return {"clean": clean, "curves": curves, "eps": eps_values, "n": n,
                "test_subset_seed": runner.config.seed}

    record = runner.cached_record(figure.get("record", "eps_sweep"), spec, compute)
    _render_sweep(runner, figure, record, out)
    return record


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


def _fmt(d: dict) -> str:
    return _acc(d).format()


def _render_sweep(runner: "Runner", figure: dict, record: dict, out: Path) -> None:
    summary = sweep_summary(record)
    labels = list(record["curves"])
    eps = record["eps"]
    clean = record["clean"]
    lines = [f"# eps sweep: {figure.get('title', figure['shield'])}", "",
             f"Pipeline: shield `{figure['shield']}` + classifier `{figure['classifier']}`; "
             f"{_data_label(runner)}, n = {record['n']} test images (seeded subset), L-inf, "
             f"{len(eps)} eps values in [{eps[0]}, {eps[-1]}]. Clean accuracy "
             f"{_fmt(clean)} (a reject counts as an error; clean reject rate "
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
        lines.append(f"| {label} | {s['worst_eps']} | {_fmt(s['worst'])} | {_fmt(s['all_eps'])} |")
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
        cells = [_fmt(record["curves"][lab][i]["robust"]) for lab in labels]
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {_fmt(summary['worst_over_attacks'][i]['robust'])} |")
    write_text_atomic(out / figure.get("table", "eps_sweep.md"), "\n".join(lines) + "\n")

    plt = _plt()
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
    ax.set_title(f"{_data_label(runner)}: {figure.get('title', figure['shield'])}, n={record['n']} "
                 "(star = worst eps)", fontsize=8)
    ax.set_ylim(0, 101)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_png(fig, out / figure.get("file", "eps_sweep.png"))


# ---- detectors: held-out FPR and the RMSE gap ---------------------------------------------
def _members(detector) -> list[tuple[str, object]]:
    members = getattr(detector, "members", None)
    if members is None:
        return [(getattr(detector, "name", type(detector).__name__), detector)]
    return [(getattr(d, "name", type(d).__name__), d) for d in members] + [("any (combined)", detector)]


@torch.no_grad()
def _reject_flags(detector, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([detector.rejects(b) for b in x.split(batch_size)])


def detector_analysis(runner: "Runner", figure: dict, out: Path) -> dict:
    """False-positive rate of each detector on the held-out test set vs. its calibrated rate, and
    the mean smallest RMSE of PuVAE on clean vs. PGD inputs."""
    classifier = figure["classifier"]
    detectors: dict[str, str] = figure["detectors"]
    n_rmse = int(figure.get("n_rmse", 1000))
    rmse_attacks: dict[str, dict] = figure["rmse_attacks"]
    spec = {"models": {k: _model_key(runner, s, classifier) for k, s in detectors.items()},
            "rmse_shield": figure["rmse_shield"], "n_rmse": n_rmse, "rmse_attacks": rmse_attacks,
            "seed": runner.config.seed}

    def compute() -> dict:
        rows = []
        for label, shield in detectors.items():
            model = _pipeline(runner, shield, classifier)
            rate = runner.config.shields[shield].fpr
            torch.manual_seed(runner.config.seed)
            for name, det in _members(model.detector):
                test_flags = _reject_flags(det, runner.test.images)
                val_flags = _reject_flags(det, runner.val.images)
                fp = Accuracy(int(test_flags.sum()), test_flags.numel())
                lo, hi = fp.interval
                calibrated = rate if name != "any (combined)" else None
                rows.append({"pipeline": label, "detector": name, "calibrated_fpr": calibrated,
                             "calibration_set": f"val ({len(runner.val)} clean images)",
                             "val_fpr": float(val_flags.float().mean()),
                             "test_fpr": fp.value, "test_false_positives": fp.correct,
                             "test_n": fp.n, "ci95": [lo, hi],
                             "within_factor_2": (None if calibrated is None
                                                 else bool(calibrated / 2 <= fp.value <= 2 * calibrated))})
        model = _pipeline(runner, figure["rmse_shield"], classifier)
        test = runner.test.subset(n_rmse, seed=runner.config.seed)
        from ..attacks import run_attack
        from ..eval.harness import adapt_model

        rmse = {}
        with torch.no_grad():
            clean_scores = torch.cat([model.purifier.min_rmse(b) for b in test.images.split(500)])
        rmse["clean"] = {"mean": float(clean_scores.mean()), "std": float(clean_scores.std()),
                         "rejected": float((clean_scores > model.detector.threshold).float().mean())}
        for label, a in rmse_attacks.items():
            spec_a = _attack(a, float(a.get("eps", 0.3)) if "eps" in a else 0.3)
            threat = ThreatModel("Linf", 0.3)
            attack_model = adapt_model(model, spec_a)
            gen = torch.Generator().manual_seed(runner.config.seed)
            advs = [run_attack(spec_a.name, attack_model, xb, yb, threat, gen, **spec_a.params)
                    for xb, yb in zip(test.images.split(500), test.labels.split(500))]
            with torch.no_grad():
                scores = torch.cat([model.purifier.min_rmse(x) for x in advs])
                labels = torch.cat([model.predict(x) for x in advs])
            rmse[label] = {"mean": float(scores.mean()), "std": float(scores.std()),
                           "rejected": float((scores > model.detector.threshold).float().mean()),
                           "fooled_not_rejected": float(((labels != test.labels) & (labels != -1)).float().mean())}
        return {"detectors": rows, "rmse": rmse, "rmse_n": n_rmse,
                "threshold": float(model.detector.threshold)}

    record = runner.cached_record(figure.get("record", "detectors"), spec, compute)
    lines = ["# Detectors: held-out false-positive rates and PuVAE's RMSE gap", "",
             f"{_data_label(runner)}; every threshold was set on the clean validation split "
             f"({len(runner.val)} images, disjoint from training and test) at the stated rate, then "
             f"measured on the full test set (n = {len(runner.test)}). Acceptance: the measured rate "
             "lies within a factor of 2 of the calibrated one. MagNet calibrates each detector at the "
             "stated rate; the combined detector rejects if any member does.", "",
             "| pipeline | detector | calibrated FPR | FPR on val | FPR on test [Wilson 95%] | false positives / n | within x2 |",
             "|---|---|---|---|---|---|---|"]
    for r in record["detectors"]:
        cal = "-" if r["calibrated_fpr"] is None else f"{100 * r['calibrated_fpr']:.2f}%"
        ok = "-" if r["within_factor_2"] is None else ("yes" if r["within_factor_2"] else "**no**")
        lines.append(f"| {r['pipeline']} | {r['detector']} | {cal} | {100 * r['val_fpr']:.2f}% | "
                     f"{100 * r['test_fpr']:.2f}% [{100 * r['ci95'][0]:.2f}, {100 * r['ci95'][1]:.2f}] | "
                     f"{r['test_false_positives']} / {r['test_n']} | {ok} |")
    lines += ["", f"## Smallest reconstruction RMSE of PuVAE (`{figure['rmse_shield']}`), n = {record['rmse_n']}",
              "", f"Detector threshold t = {record['threshold']:.4f}. Paper (MNIST): 0.04 clean, 0.13 "
              "under PGD at eps 0.3.", "",
              "| input | mean RMSE | std | rejected | misclassified and not rejected |", "|---|---|---|---|---|"]
    for label, v in record["rmse"].items():
        fooled = f"{100 * v['fooled_not_rejected']:.1f}%" if "fooled_not_rejected" in v else "-"
        lines.append(f"| {label} | {v['mean']:.4f} | {v['std']:.4f} | {100 * v['rejected']:.1f}% | {fooled} |")
    write_text_atomic(out / figure.get("table", "detectors.md"), "\n".join(lines) + "\n")
    return record


# ---- the sampled mode under EOT --------------------------------------------------------------
def sampling_analysis(runner: "Runner", figure: dict, out: Path) -> dict:
    """The same cascade on several pipelines (e.g. PuVAE sampled with EOT vs. z = mean)."""
    classifier = figure["classifier"]
    n = int(figure.get("n", 200))
    eps = float(figure.get("eps", 0.3))
    pipelines: dict[str, dict] = figure["pipelines"]  # label -> {shield, attacks}
    spec = {"models": {k: _model_key(runner, v["shield"], classifier) for k, v in pipelines.items()},
            "pipelines": pipelines, "n": n, "eps": eps, "seed": runner.config.seed}

    def compute() -> dict:
        test = runner.test.subset(n, seed=runner.config.seed)
        out_rows = {}
        for label, p in pipelines.items():
            model = _pipeline(runner, p["shield"], classifier)
            torch.manual_seed(runner.config.seed)
            record = evaluate(model, test.images, test.labels, [_attack(a, eps) for a in p["attacks"]],
                              ThreatModel("Linf", eps), batch_size=runner.config.batch_size,
                              seed=runner.config.seed, progress=False)
            out_rows[label] = record.to_dict()
            logger.info("sampling %s: clean %s, robust %s", label, record.clean.format(), record.robust.format())
        return {"pipelines": out_rows, "n": n}

    record = runner.cached_record(figure.get("record", "sampling"), spec, compute)
    lines = ["# PuVAE's sampling: EOT over z ~ q(z|x,y) vs. the deterministic mode (z = mean)", "",
             f"{_data_label(runner)}, classifier `{classifier}`, n = {n} test images (seeded subset), "
             f"L-inf eps {eps}. Each pipeline's detector is calibrated in its own mode. Cells: "
             "accuracy % [Wilson 95%] after each attack of the cascade (cumulative worst case).", ""]
    if figure.get("note"):
        lines += [figure["note"].strip(), ""]
    for label, r in record["pipelines"].items():
        rec = EvalRecord.from_dict(r)
        rr = rec.clean_reject_rate
        lines += [f"## {label}", "", f"clean {rec.clean.format()}" +
                  (f", clean reject rate {100 * rr:.1f}%" if rr is not None else ""), "",
                  "| attack (cumulative) | accuracy |", "|---|---|"]
        lines += [f"| {a.name} | {a.accuracy_after.format()} |" for a in rec.attacks] + [""]
    write_text_atomic(out / figure.get("table", "sampling.md"), "\n".join(lines) + "\n")
    return record


# ---- Figure 6 -------------------------------------------------------------------------------
def figure6(runner: "Runner", figure: dict, out: Path) -> dict:
    """A clean input and its adversarial version, each with its N class-conditional
    reconstructions; the one PuVAE selects (smallest RMSE) is framed."""
    shield, classifier = figure["shield"], figure["classifier"]
    index = int(figure.get("index", 0))
    attack = figure.get("attack", {"name": "pgd", "wrap": "classifier",
                                   "params": {"steps": 40, "step_size": 0.01}})
    eps = float(figure.get("eps", 0.3))
    spec = {"model": _model_key(runner, shield, classifier), "index": index, "attack": attack, "eps": eps,
            "seed": runner.config.seed}

    def compute() -> dict:
        from ..attacks import run_attack
        from ..eval.harness import adapt_model

        model = _pipeline(runner, shield, classifier)
        test = runner.test.subset(index + 1, seed=runner.config.seed + 11)
        x, y = test.images[index:index + 1], test.labels[index:index + 1]
        a = _attack(attack, eps)
        gen = torch.Generator().manual_seed(runner.config.seed)
        x_adv = run_attack(a.name, adapt_model(model, a), x, y, ThreatModel("Linf", eps), gen, **a.params)
        panels = []
        for name, inp in (("clean", x), ("adversarial", x_adv)):
            with torch.no_grad():
                torch.manual_seed(runner.config.seed)
                recons = model.purifier.reconstructions(inp)[0]
                rmse = (recons - inp).pow(2).flatten(1).mean(1).sqrt()
                label = int(model.predict(inp)[0])
                bare = int(model.classifier(inp).argmax(1)[0])
            panels.append({"input": name, "image": inp[0].round(decimals=3).tolist(),
                           "reconstructions": recons.round(decimals=3).tolist(),
                           "rmse": rmse.tolist(), "chosen": int(rmse.argmin()),
                           "pipeline_label": label, "bare_classifier_label": bare})
        return {"true_label": int(y[0]), "panels": panels, "attack": a.title, "eps": eps,
                "threshold": float(model.detector.threshold) if model.detector is not None else None}

    record = runner.cached_record(figure.get("record", "figure6"), spec, compute)
    plt = _plt()
    panels = record["panels"]
    k = len(panels[0]["reconstructions"])
    fig, axes = plt.subplots(len(panels), k + 1, figsize=((k + 1) * 0.95, len(panels) * 1.35))
    for r, p in enumerate(panels):
        img = torch.tensor(p["image"])
        axes[r, 0].imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
        verdict = "reject" if p["pipeline_label"] == -1 else str(p["pipeline_label"])
        axes[r, 0].set_title(f"{p['input']}\nF(x)={p['bare_classifier_label']}, out={verdict}", fontsize=6)
        for c in range(k):
            ax = axes[r, c + 1]
            ax.imshow(torch.tensor(p["reconstructions"][c]).permute(1, 2, 0).squeeze(-1), cmap="gray",
                      vmin=0, vmax=1)
            chosen = c == p["chosen"]
            ax.set_title(f"y={c}\n{p['rmse'][c]:.3f}", fontsize=6, color="red" if chosen else "black")
            for spine in ax.spines.values():
                spine.set_visible(chosen)
                spine.set_color("red")
                spine.set_linewidth(2.5)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    t = record["threshold"]
    fig.suptitle(f"{_data_label(runner)}: true label {record['true_label']}; {record['attack']} at eps "
                 f"{record['eps']}; titles: class, RMSE; red = selected (min RMSE)"
                 + (f"; reject if min RMSE > {t:.3f}" if t is not None else ""), fontsize=7)
    fig.tight_layout()
    _save_png(fig, out / figure.get("file", "figure6_reconstructions.png"))
    return record


# ---- the seed paper's table layout -------------------------------------------------------------
def paper_table(runner: "Runner", figure: dict, out: Path) -> None:
    """Rows = attacks (the config's columns), columns = defenses (the config's rows), plus the
    detector pipeline at its worst-case eps from the sweep record. Built from table.json."""
    import json

    from .runner import _slug

    table = json.loads((out / "table.json").read_text())
    cells = {(c["row"], c["column"]): c for c in table["cells"]}
    sweep_path = out / "records" / f"{figure.get('sweep_record', 'eps_sweep')}.json"
    sweep = json.loads(sweep_path.read_text()) if sweep_path.exists() else None
    summary = sweep_summary(sweep) if sweep else None
    worst_map: dict[str, str] = figure.get("worst_eps", {})
    defenses = [r.label for r in runner.config.rows]
    worst_label = figure.get("worst_label", "PuVAE + detector, worst-case eps")
    insert_after = figure.get("worst_after", defenses[-1])
    header = []
    for d in defenses:
        header.append(d)
        if d == insert_after:
            header.append(worst_label)
    lines = [f"# {figure.get('title', runner.config.title)}", "",
             f"The seed paper's layout: rows are attacks, columns are defenses. {_data_label(runner)}, "
             f"n = {runner.config.n} test images (seeded subset) for every column except "
             f"\"{worst_label}\", which comes from the eps sweep "
             f"(n = {sweep['n'] if sweep else '-'}, its own seeded subset; the eps with the lowest "
             "accuracy, per attack). Cells: accuracy % [Wilson 95%]. Clean inputs count as correct "
             "only with their true label (a reject is an error); adversarial inputs count as handled "
             "with their true label or a reject.", ""]
    for column in runner.config.columns:
        if column.suites:
            threat = "; ".join(f"`{s}`" for s in column.suites)
            lines.append(f"- **{column.label}**: suites {threat}")
    lines += ["", "| attack | " + " | ".join(header) + " |", "|---|" + "---|" * len(header)]
    for column in runner.config.columns:
        texts = []
        for h in header:
            if h == worst_label:
                sweep_label = worst_map.get(column.label)
                if summary and sweep_label in summary["attacks"]:
                    s = summary["attacks"][sweep_label]
                    texts.append(f"{_fmt(s['worst'])} (eps {s['worst_eps']})")
                else:
                    texts.append("-")
                continue
            c = cells.get((h, column.label))
            if c and _all_skipped(out, runner, h, column):
                texts.append("n/a (no detector)")
            else:
                texts.append(c["text"] if c else "-")
        lines.append(f"| {column.label} | " + " | ".join(texts) + " |")
    lines += ["", "Clean false-reject rate of each pipeline (clean test inputs rejected, n = "
              f"{runner.config.n}):", ""]
    for row in runner.config.rows:
        for path in sorted((out / "records").glob(f"{_slug(row.label)}__*.json")):
            if path.name.endswith(".partial.json"):
                continue
            rec = json.loads(path.read_text())
            rr = rec.get("clean_reject_rate")
            lines.append(f"- {row.label}: " + ("no detector" if rr is None else f"{100 * rr:.1f}%"))
            break
    write_text_atomic(out / figure.get("file", "table_paper.md"), "\n".join(lines) + "\n")


def _all_skipped(out: Path, runner: "Runner", row_label: str, column) -> bool:
    """True when every attack of the column's suites was not applicable to this pipeline."""
    import json

    from .runner import _slug

    if not column.suites:
        return False
    for suite in column.suites:
        for path in (out / "records").glob(f"{_slug(row_label)}__*__{suite}.json"):
            attacks = json.loads(path.read_text())["attacks"]
            if any("skipped" not in a["settings"] for a in attacks):
                return False
    return True
