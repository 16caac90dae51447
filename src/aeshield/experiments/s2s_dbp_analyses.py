"""Analyses of the S2SNet and DBP targets (figure kinds of the runner).

Each one measures first, through ``Runner.cached_record`` (``<out>/records/<name>.json``,
recomputed only when its spec changes), then renders its markdown table and PNG from that
record alone:

- ``s2s-curves``: accuracy vs. perturbation strength for FGSM, BIM and CW in the white-box,
  white-box* and gray-box threat models, on the test images the classifier originally got right;
- ``s2s-noise``: clean-accuracy cost (and white-box FGSM accuracy, EOT) of input-noise layers;
- ``s2s-gradients``: SSIM between gradient maps (S2SNet Table 1 layout) and across labels;
- ``dbp-smoothness``: Jacobian norm, input-gradient norm and reconstruction error (DBP Table 1);
- ``dbp-auddc``: output and latent attacks on the autoencoders, AUDDC, Figure-5-like picture;
- ``gmm-latent``: encoder + GMM classifier: clean accuracy, FGSM / PGD with and without the
  softened stand-in, transfer from a plain CNN, and an image-transition strip.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..attacks import EOT, fgsm, run_attack
from ..attacks.adaptive import other_class_targets
from ..attacks.autoencoder import autoencoder_attack, c_values
from ..defenses.base import Shielded, predict
from ..defenses.dbp import jacobian_frobenius, recon_grad_penalty, reconstruction_error
from ..defenses.gmm import GaussianMixtureClassifier, LatentGMMClassifier, Softened, softening_temperature
from ..defenses.s2snet import InputNoise, S2SNet
from ..eval.auddc import auddc_batch
from ..stats import mean_interval
from ..eval.gradients import (ce_loss, gradient_map, label_ssim, pairwise_ssim, random_other_labels,
                              reconstruction_loss)
from ..eval.harness import AttackSpec, evaluate
from ..records import Accuracy
from ..io import write_text_atomic
from ..stats import paired_ratio_interval
from ..threat import ThreatModel

if TYPE_CHECKING:
    from .runner import Runner

logger = logging.getLogger(__name__)
THREAT_MODELS = ("white-box", "white-box*", "gray-box")


# ---- small helpers ------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    _plt().close(fig)
    tmp.replace(path)


def _acc(flags: torch.Tensor) -> dict:
    return Accuracy.from_flags(flags.cpu()).to_dict()


def _fmt(acc: dict) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _fmt_mean(m: dict, digits: int = 3) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] (sd {m['std']:.{digits}f})"


def _shield_key(runner: "Runner", name: str) -> dict:
    """The shield's spec hash and its weight file's hash (loads it; a record measured on other
    weights is then recomputed, as the runner's evaluation records are)."""
    runner.shield(name)
    return {"spec": runner.shield_artifact(name)[1],
            "weights": runner.weight_hashes([f"shield-{name}"])[f"shield-{name}"]}


def _classifier_key(runner: "Runner", name: str) -> dict:
    runner.classifier(name)
    return {**runner.classifier_specs([name]), "weights": runner.weight_hashes([name])[name]}


def _correct_subset(runner: "Runner", classifier: nn.Module, n: int, seed: int):
    """The first ``n`` test images (seeded order) that ``classifier`` labels correctly."""
    pool = runner.test.subset(min(len(runner.test), 2 * n + 100), seed=seed)
    ok = predict(classifier, pool.images) == pool.labels
    x, y = pool.images[ok][:n], pool.labels[ok][:n]
    return x.to(runner.device), y.to(runner.device), int(ok[: len(ok)].sum())


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


# ---- S2SNet: accuracy vs. strength in three threat models -----------------------------------
def strength_curves(runner: "Runner", figure: dict, out: Path) -> None:
    """White-box (craft and evaluate on F(S(.))), white-box* (craft on F, evaluate F(S(.))) and
    gray-box (craft on F(S(.)), evaluate F) accuracy on inputs F originally classified right."""
    name = figure.get("name", "s2s_curves")
    clf_name, shields = figure["classifier"], dict(figure["shields"])
    attacks = {k: dict(v) for k, v in figure["attacks"].items()}
    n = int(figure.get("n", 200))
    spec = {"classifier": _classifier_key(runner, clf_name), "shields": {k: _shield_key(runner, v)
            for k, v in shields.items()}, "attacks": attacks, "n": n, "seed": runner.config.seed}

    def compute() -> dict:
        classifier = runner.classifier(clf_name)
        x, y, _ = _correct_subset(runner, classifier, n, runner.config.seed + 11)
        pipes = {label: Shielded(runner.shield(s), classifier).eval() for label, s in shields.items()}
        rows: list[dict] = []
        for attack, settings in attacks.items():
            for strength in settings["strengths"]:
                x_f = _craft(attack, classifier, x, y, strength, settings)
                base = {"attack": attack, "strength": strength}
                rows.append({**base, "pipeline": "undefended", "threat_model": "white-box",
                             "dissimilarity": _dissimilarity(x, x_f),
                             "accuracy": _acc(predict(classifier, x_f) == y)})
                for label, pipe in pipes.items():
                    rows.append({**base, "pipeline": label, "threat_model": "white-box*",
                                 "dissimilarity": _dissimilarity(x, x_f),
                                 "accuracy": _acc(predict(pipe, x_f) == y)})
                    x_s = _craft(attack, pipe, x, y, strength, settings)
                    rows.append({**base, "pipeline": label, "threat_model": "white-box",
                                 "dissimilarity": _dissimilarity(x, x_s),
                                 "accuracy": _acc(predict(pipe, x_s) == y)})
                    rows.append({**base, "pipeline": label, "threat_model": "gray-box",
                                 "dissimilarity": _dissimilarity(x, x_s),
                                 "accuracy": _acc(predict(classifier, x_s) == y)})
                logger.info("s2s-curves %s %.3g done", attack, strength)
        clean = {label: _acc(predict(pipe, x) == y) for label, pipe in pipes.items()}
        return {"n": int(len(y)), "rows": rows, "clean_on_subset": clean}

    record = runner.cached_record(name, spec, compute)
    _render_curves(record, attacks, list(shields), out, name)


def _render_curves(record: dict, attacks: dict, labels: list[str], out: Path, name: str) -> None:
    plt = _plt()
    rows = record["rows"]
    lines = [f"# S2SNet: accuracy vs. strength (n = {record['n']} test images the classifier "
             "originally classified correctly; accuracy % [Wilson 95%]; d = mean normalized L2 "
             "dissimilarity ||x - x_adv|| / ||x||)", "",
             "Threat models: white-box = crafted and evaluated on F(S(.)); white-box* = crafted on "
             "F alone, evaluated on F(S(.)) (BPDA with the identity); gray-box = crafted on "
             "F(S(.)), evaluated on F alone. `undefended` = F attacked and evaluated alone.", "",
             "Clean accuracy of each pipeline on this subset: " + ", ".join(
                 f"{k} {_fmt(v)}" for k, v in record["clean_on_subset"].items()), ""]
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
                f"{_fmt(r['accuracy'])} (d={r['dissimilarity']:.3f})" for r in pts) + " |")
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
        _save(fig, out / f"{name}_{attack}.png")
        lines.append("")
    write_text_atomic(out / f"{name}.md", "\n".join(lines))


# ---- S2SNet: input-noise layers -----------------------------------------------------------
def noise_sweep(runner: "Runner", figure: dict, out: Path) -> None:
    """Clean accuracy of F(S(noise(x))) for each noise kind and scale, and white-box FGSM
    accuracy through the noisy pipeline with EOT."""
    name = figure.get("name", "s2s_noise")
    clf_name, shield = figure["classifier"], figure["shield"]
    kinds, scales = list(figure.get("kinds", ["gaussian", "uniform", "sign"])), list(figure["scales"])
    n, eps, samples = int(figure.get("n", 500)), float(figure.get("fgsm_eps", 0.1)), int(figure.get("eot", 8))
    spec = {"classifier": _classifier_key(runner, clf_name), "shield": _shield_key(runner, shield),
            "kinds": kinds, "scales": scales, "n": n, "fgsm_eps": eps, "eot": samples,
            "seed": runner.config.seed}

    def compute() -> dict:
        classifier = runner.classifier(clf_name)
        autoencoder = runner.shield(shield).autoencoder
        test = runner.test.subset(n, seed=runner.config.seed + 13)
        x, y = test.images.to(runner.device), test.labels.to(runner.device)
        rows = []
        for kind in kinds:
            for s in scales:
                torch.manual_seed(runner.config.seed)  # the noise layers draw from the global RNG
                pipe = Shielded(S2SNet(autoencoder, InputNoise(kind, s)), classifier).eval()
                clean = predict(pipe, x) == y
                x_adv = fgsm(EOT(pipe, samples), x, y, eps=eps)
                rows.append({"kind": kind, "s": s, "clean": _acc(clean),
                             "fgsm": _acc(predict(pipe, x_adv) == y)})
        torch.manual_seed(runner.config.seed)
        plain = Shielded(S2SNet(autoencoder), classifier).eval()
        x_adv = fgsm(plain, x, y, eps=eps)
        return {"n": n, "rows": rows, "no_noise": {"clean": _acc(predict(plain, x) == y),
                                                   "fgsm": _acc(predict(plain, x_adv) == y)},
                "classifier_alone_clean": _acc(predict(classifier, x) == y)}

    r = runner.cached_record(name, spec, compute)
    lines = [f"# S2SNet input-noise layers (n = {r['n']} test images; accuracy % [Wilson 95%])", "",
             f"Pipeline F(S(noise(x))) with S = shield `{shield}`, F = `{clf_name}`. FGSM: white-box, "
             f"L-inf eps {eps}, crafted through the whole noisy pipeline with EOT over {samples} draws "
             "and evaluated on one fresh draw.", "",
             f"Classifier alone, clean: {_fmt(r['classifier_alone_clean'])}. S2SNet without noise: "
             f"clean {_fmt(r['no_noise']['clean'])}, FGSM {_fmt(r['no_noise']['fgsm'])}.", "",
             "| noise | s | clean | clean-accuracy cost (points) | FGSM (EOT) |", "|---|---|---|---|---|"]
    base = r["no_noise"]["clean"]["accuracy"]
    for row in r["rows"]:
        lines.append(f"| {row['kind']} | {row['s']} | {_fmt(row['clean'])} | "
                     f"{100 * (base - row['clean']['accuracy']):.1f} | {_fmt(row['fgsm'])} |")
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = _plt()
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
    _save(fig, out / f"{name}.png")


# ---- S2SNet: gradient maps and SSIM --------------------------------------------------------
GRADIENT_KINDS = ("classifier", "AE + classifier", "S2SNet + classifier", "S2SNet recon loss",
                  "AE recon loss")


def gradient_similarity(runner: "Runner", figure: dict, out: Path) -> None:
    """Mean SSIM between input-gradient magnitude maps (S2SNet Table 1) and across labels."""
    name = figure.get("name", "s2s_gradients")
    clf_name, s2s, plain = figure["classifier"], figure["s2snet"], figure["plain"]
    n, shown = int(figure.get("n", 500)), int(figure.get("show", 4))
    spec = {"classifier": _classifier_key(runner, clf_name), "s2snet": _shield_key(runner, s2s),
            "plain": _shield_key(runner, plain), "n": n, "show": shown, "seed": runner.config.seed}

    def compute() -> dict:
        classifier = runner.classifier(clf_name)
        s_ae, p_ae = runner.shield(s2s), runner.shield(plain)
        test = runner.test.subset(n, seed=runner.config.seed + 17)
        x, y = test.images.to(runner.device), test.labels.to(runner.device)
        losses = {"classifier": ce_loss(classifier),
                  "AE + classifier": ce_loss(Shielded(p_ae, classifier)),
                  "S2SNet + classifier": ce_loss(Shielded(s_ae, classifier)),
                  "S2SNet recon loss": reconstruction_loss(s_ae),
                  "AE recon loss": reconstruction_loss(p_ae)}
        maps = {k: gradient_map(f, x, y) for k, f in losses.items()}
        y_other = random_other_labels(y, 10, torch.Generator().manual_seed(runner.config.seed))
        labels = {k: label_ssim(losses[k], x, y, y_other) for k in GRADIENT_KINDS[:3]}
        pictures = {"input": x[:shown].squeeze(1).tolist(),
                    **{k: m[:shown].squeeze(1).tolist() for k, m in maps.items()}}
        pictures = {k: [[[round(v, 3) for v in row] for row in img] for img in imgs]
                    for k, imgs in pictures.items()}
        return {"n": n, "pairwise": pairwise_ssim(maps), "true_vs_random_label": labels,
                "maps": pictures}

    r = runner.cached_record(name, spec, compute)
    lines = [f"# Gradient-map similarity (S2SNet Table 1 layout; n = {r['n']} test images)", "",
             "Maps: |d loss / d x| summed over channels, scaled to [0, 1] per image; SSIM from "
             "pytorch-msssim (7x7 Gaussian window). Cells: mean SSIM [95% interval of the mean] "
             "(sd). `classifier` etc. use the cross-entropy with the true label; `recon loss` is "
             "||S(x) - x||^2.", "",
             "| | " + " | ".join(GRADIENT_KINDS) + " |", "|---|" + "---|" * len(GRADIENT_KINDS)]
    for a in GRADIENT_KINDS:
        lines.append(f"| {a} | " + " | ".join(
            "1" if a == b else f"{r['pairwise'][a][b]['mean']:.3f} [{r['pairwise'][a][b]['ci95'][0]:.3f}, "
            f"{r['pairwise'][a][b]['ci95'][1]:.3f}]" for b in GRADIENT_KINDS) + " |")
    lines += ["", "## Same pipeline, true label vs. a random other label", "",
              "High SSIM: the gradient's shape does not depend on the class (structure); low: it "
              "carries the class signal.", "", "| pipeline | SSIM(true, random label) |", "|---|---|"]
    for k, v in r["true_vs_random_label"].items():
        lines.append(f"| {k} | {_fmt_mean(v)} |")
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = _plt()
    keys = ["input", *GRADIENT_KINDS]
    count = len(r["maps"]["input"])
    fig, axes = plt.subplots(count, len(keys), figsize=(len(keys) * 1.6, count * 1.6))
    for i in range(count):
        for j, k in enumerate(keys):
            ax = axes[i, j]
            ax.imshow(r["maps"][k][i], cmap="gray" if k == "input" else "inferno", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(k, fontsize=7)
    fig.suptitle("input-gradient magnitude maps", fontsize=8)
    fig.tight_layout()
    _save(fig, out / f"{name}.png")


# ---- DBP: smoothness -------------------------------------------------------------------------
# Record keys, in table column order: what DBP should shrink, then what it may cost.
SMOOTHNESS = ("jacobian_frobenius", "jacobian_frobenius_sq", "recon_loss_grad_norm", "recon_loss_grad_norm_sq")
RECONSTRUCTION = ("reconstruction_error", "reconstruction_distance")


def smoothness(runner: "Runner", figure: dict, out: Path) -> None:
    """||d x'/d x||_F (exact), ||d recon_loss / d x||_2 and the reconstruction error, per VAE.

    Each is reported in two units: the Jacobian as its norm and its square, the reconstruction
    error as the per-image sum of squares and as the L2 distance ``||x' - x||_2``. The DBP paper's
    Table 1 does not name its units; its magnitudes (docs/NOTES.md, session 11) fit the squared
    norm and the distance, while the norm and the sum of squares are what this table first
    reported. With two models, the second is compared with the first on the same images
    (ratios with paired bootstrap intervals)."""
    name = figure.get("name", "dbp_smoothness")
    shields = dict(figure["shields"])
    n, n_jac = int(figure.get("n", 1000)), int(figure.get("n_jacobian", 100))
    # "measures" names the record's layout: records of the one-unit layout are recomputed.
    spec = {"shields": {k: _shield_key(runner, v) for k, v in shields.items()}, "n": n,
            "n_jacobian": n_jac, "seed": runner.config.seed, "measures": 3}

    def compute() -> dict:
        test = runner.test.subset(n, seed=runner.config.seed + 19)
        x = test.images.to(runner.device)
        rows, per_image = {}, {}
        for label, s in shields.items():
            vae = runner.shield(s)
            with torch.no_grad():
                error = torch.cat([reconstruction_error(vae(b), b) for b in x.split(500)])
            # The penalty is already the squared gradient norm: take its root, not root-then-square.
            grad_sq = torch.cat([recon_grad_penalty(vae, b, create_graph=False) for b in x.split(500)])
            jac = torch.cat([jacobian_frobenius(vae, b) for b in x[:n_jac].split(50)])
            per_image[label] = {"jacobian_frobenius": jac, "jacobian_frobenius_sq": jac.pow(2),
                                "recon_loss_grad_norm": grad_sq.sqrt(), "recon_loss_grad_norm_sq": grad_sq,
                                "reconstruction_error": error, "reconstruction_distance": error.sqrt()}
            rows[label] = {k: mean_interval(v) for k, v in per_image[label].items()}
        comparison = {}
        if len(shields) == 2:
            base, other = (per_image[k] for k in shields)
            seed = runner.config.seed + 23
            # Smoothness: how many times smaller; reconstruction: how many times larger.
            comparison = {k: paired_ratio_interval(base[k], other[k], seed=seed) for k in SMOOTHNESS}
            comparison |= {k: paired_ratio_interval(other[k], base[k], seed=seed) for k in RECONSTRUCTION}
        return {"n": n, "n_jacobian": n_jac, "rows": rows, "comparison": comparison}

    r = runner.cached_record(name, spec, compute)
    labels = list(r["rows"])
    lines = [f"# DBP Table 1 layout: smoothness and reconstruction ({runner.config.dataset})", "",
             f"Test images: n = {r['n']} (reconstruction error, gradient norm), n = {r['n_jacobian']} "
             "(exact Jacobian, one vector-Jacobian product per output pixel). Reconstruction of "
             "decode(mu). Cells: mean [95% interval of the mean] (sd).", "",
             "| model | ‖dx'/dx‖_F | ‖dx'/dx‖_F^2 | ‖d recon_loss/dx‖_2 | ‖d recon_loss/dx‖_2^2 | "
             "reconstruction error, sum of squares | reconstruction error, ‖x' - x‖_2 |",
             "|---|---|---|---|---|---|---|"]
    for label in labels:
        row = r["rows"][label]
        lines.append(f"| {label} | " + " | ".join(_fmt_mean(row[k]) for k in SMOOTHNESS + RECONSTRUCTION) + " |")
    if r["comparison"]:
        c = r["comparison"]

        def cut(k: str) -> str:
            lo, hi = c[k]["ci95"]
            return f"{c[k]['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]"

        def cost(k: str) -> str:
            lo, hi = c[k]["ci95"]
            return f"{100 * (c[k]['ratio'] - 1):+.1f}% [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]"

        lines += ["", f"{labels[1]} against {labels[0]}, on the same images (95% interval: "
                  f"{c['jacobian_frobenius']['ci_method']}):", "",
                  "| units | smoothness: how many times smaller | reconstruction error: cost |",
                  "|---|---|---|",
                  f"| norm, sum of squares | ‖dx'/dx‖_F {cut('jacobian_frobenius')} | "
                  f"{cost('reconstruction_error')} |",
                  f"| squared norm, L2 distance | ‖dx'/dx‖_F^2 {cut('jacobian_frobenius_sq')} | "
                  f"{cost('reconstruction_distance')} |",
                  f"| reconstruction-loss gradient, L2 distance | ‖d recon_loss/dx‖_2 "
                  f"{cut('recon_loss_grad_norm')} | {cost('reconstruction_distance')} |",
                  f"| squared reconstruction-loss gradient (DBP's penalty), L2 distance | "
                  f"‖d recon_loss/dx‖_2^2 {cut('recon_loss_grad_norm_sq')} | "
                  f"{cost('reconstruction_distance')} |"]
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")


# ---- DBP: attacks on the autoencoders, AUDDC, Figure 5 -------------------------------------
def auddc_analysis(runner: "Runner", figure: dict, out: Path) -> None:
    """Output and latent attacks on each autoencoder over the same (original, target) pairs."""
    name = figure.get("name", "dbp_auddc")
    shields = dict(figure["shields"])
    modes = list(figure.get("modes", ["output", "latent"]))
    pairs, count = int(figure.get("pairs", 20)), int(figure.get("c_count", 50))
    low, high = float(figure.get("c_low", 1e-3)), float(figure.get("c_high", 1e3))
    steps, lr = int(figure.get("steps", 300)), float(figure.get("lr", 0.01))
    shown, fig_c = int(figure.get("show", 4)), float(figure.get("figure_c", 1.0))
    spec = {"shields": {k: _shield_key(runner, v) for k, v in shields.items()}, "modes": modes,
            "pairs": pairs, "c": [count, low, high], "steps": steps, "lr": lr, "show": shown,
            "figure_c": fig_c, "seed": runner.config.seed}

    def compute() -> dict:
        test = runner.test.subset(pairs, seed=runner.config.seed + 23)
        x, y = test.images.to(runner.device), test.labels.to(runner.device)
        x_t = other_class_targets(x, y)
        cs = c_values(count, low, high)
        pick = int((cs - fig_c).abs().argmin())
        results: dict[str, Any] = {}
        pictures: dict[str, Any] = {"original": x[:shown].squeeze(1).tolist(),
                                    "target": x_t[:shown].squeeze(1).tolist()}
        for label, s in shields.items():
            ae = runner.shield(s)
            results[label] = {}
            for mode in modes:
                res = autoencoder_attack(ae, x, x_t, mode=mode, c=cs, steps=steps, lr=lr,
                                         generator=torch.Generator().manual_seed(runner.config.seed))
                areas = auddc_batch(res.distortion, res.distance)
                results[label][mode] = {"auddc": mean_interval(areas), "per_pair": areas.tolist(),
                                        "distortion": res.distortion.tolist(), "distance": res.distance.tolist()}
                if mode == "output":
                    with torch.no_grad():
                        adv = res.x_adv[:shown, pick]
                        pictures[f"{label}: adversarial input"] = adv.squeeze(1).tolist()
                        pictures[f"{label}: its reconstruction"] = ae(adv).squeeze(1).tolist()
                        pictures[f"{label}: target reconstruction"] = ae(x_t[:shown]).squeeze(1).tolist()
                logger.info("auddc %s %s: %s", label, mode, _fmt_mean(results[label][mode]["auddc"]))
        paired = {}
        labels = list(shields)
        if len(labels) == 2:
            for mode in modes:
                diff = (torch.tensor(results[labels[1]][mode]["per_pair"])
                        - torch.tensor(results[labels[0]][mode]["per_pair"]))
                paired[mode] = mean_interval(diff)
        pictures = {k: [[[round(v, 3) for v in row] for row in img] for img in imgs]
                    for k, imgs in pictures.items()}
        return {"pairs": pairs, "c": cs.tolist(), "figure_c": float(cs[pick]), "results": results,
                "paired_difference": paired, "pictures": pictures}

    r = runner.cached_record(name, spec, compute)
    labels = list(r["results"])
    lines = [f"# Attacks on the autoencoders: AUDDC ({runner.config.dataset}, {r['pairs']} "
             "(original, target) pairs, each target of another class)", "",
             f"Each pair attacked at C = 0 and {len(r['c']) - 1} log-spaced values in "
             f"[{low:g}, {high:g}] (Adam, {steps} steps, lr {lr}, inside [0, 1]); objective "
             "Delta / Delta(x, x_t) + C ||delta|| / ||x - x_t||. Output attack: Delta = "
             "||AE(x+delta) - AE(x_t)||^2; latent attack: Delta = KL(q(z|x+delta) || q(z|x_t)). "
             "Curve: x = ||delta|| / ||x - x_t||, y = ||AE(x+delta) - AE(x_t)|| / ||AE(x) - AE(x_t)||, "
             "running minimum, extended to x = 1 at its lowest y. Higher AUDDC = more robust. "
             "Cells: mean [95% interval of the mean] (sd over pairs).", "",
             "| model | " + " | ".join(f"AUDDC, {m} attack" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_fmt_mean(r["results"][label][m]["auddc"]) for m in modes) + " |")
    if r["paired_difference"]:
        lines += ["", f"Paired difference {labels[1]} - {labels[0]} (same pairs): " + "; ".join(
            f"{m}: {_fmt_mean(v)}" for m, v in r["paired_difference"].items())]
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = _plt()
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    for j, mode in enumerate(modes):
        ax = axes[0, j]
        for k, label in enumerate(labels):
            res = r["results"][label][mode]
            for p, (d, s) in enumerate(zip(res["distortion"], res["distance"])):
                order = sorted(range(len(d)), key=lambda i: d[i])
                xs = [d[i] for i in order]
                ys = torch.cummin(torch.tensor([s[i] for i in order]), 0).values.tolist()
                ax.plot(xs, ys, color=f"C{k}", alpha=0.35, lw=0.8,
                        label=f"{label} (AUDDC {res['auddc']['mean']:.3f})" if p == 0 else None)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("||delta|| / ||x - x_t||", fontsize=8)
        ax.set_ylabel("||AE(x+delta) - AE(x_t)|| / ||AE(x) - AE(x_t)||", fontsize=7)
        ax.set_title(f"{mode} attack, {r['pairs']} pairs", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out / f"{name}_curves.png")
    pics = r["pictures"]
    keys = list(pics)
    count = len(pics["original"])
    fig, axes = plt.subplots(len(keys), count, figsize=(count * 1.3, len(keys) * 1.25), squeeze=False)
    for i, k in enumerate(keys):
        for j in range(count):
            ax = axes[i, j]
            ax.imshow(pics[k][j], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(k, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"output attack at C = {r['figure_c']:.3g} (same C for both models)", fontsize=8)
    fig.tight_layout()
    _save(fig, out / f"{name}_figure5.png")


# ---- DBP encoder + GMM ------------------------------------------------------------------------
def _fit_gmm(runner: "Runner", vae: nn.Module, components: int, limit: int, iterations: int) -> LatentGMMClassifier:
    train = runner.train_subset(limit)
    with torch.no_grad():
        z = torch.cat([vae.encode(b.to(runner.device)) for b in train.images.split(1000)])
    gmm = GaussianMixtureClassifier(10, components, z.shape[1]).to(runner.device)
    gmm.fit(z, train.labels.to(runner.device), iterations=iterations, seed=runner.config.seed)
    return LatentGMMClassifier(_Encoder(vae), gmm).eval()


class _Encoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x)


def gmm_analysis(runner: "Runner", figure: dict, out: Path) -> None:
    """Encoder + GMM: clean accuracy, FGSM and PGD accuracy directly (no BPDA), through the
    softened stand-in (BPDA), and transferred from a plain CNN; plus a transition strip."""
    name = figure.get("name", "gmm")
    shields = dict(figure["shields"])
    k, limit = int(figure.get("components", 5)), int(figure.get("fit_limit", 20000))
    iterations, n = int(figure.get("iterations", 100)), int(figure.get("n", 500))
    eps_list = [float(e) for e in figure.get("eps", [0.1, 0.2])]
    pgd_settings = dict(figure.get("pgd", {"steps": 40, "step_size": 0.01}))
    transfer = figure.get("transfer")
    strip_from = str(figure.get("strip", next(iter(shields))))
    spec = {"shields": {lb: _shield_key(runner, v) for lb, v in shields.items()}, "components": k,
            "fit_limit": limit, "iterations": iterations, "n": n, "eps": eps_list, "pgd": pgd_settings,
            "transfer": _classifier_key(runner, transfer) if transfer else None, "strip": strip_from,
            "seed": runner.config.seed}

    def compute() -> dict:
        test = runner.test.subset(n, seed=runner.config.seed + 29)
        x, y = test.images.to(runner.device), test.labels.to(runner.device)
        val = runner.val.subset(500, seed=1)
        rows, strip = [], {}
        for label, s in shields.items():
            model = _fit_gmm(runner, runner.shield(s), k, limit, iterations)
            temperature = softening_temperature(model, val.images.to(runner.device))
            full_clean = predict(model, runner.test.images.to(runner.device)) == runner.test.labels.to(runner.device)
            entry: dict[str, Any] = {"model": label, "temperature": temperature,
                                     "clean_full_test": _acc(full_clean), "attacks": []}
            ways = {"direct (no BPDA)": None, "BPDA (softened GMM)": Softened(model, temperature)}
            if transfer:
                ways[f"transfer from {transfer}"] = runner.classifier(transfer)
            for eps in eps_list:
                threat = ThreatModel("Linf", eps)
                for attack, params in (("fgsm", {}), ("pgd", pgd_settings)):
                    for way, surrogate in ways.items():
                        spec_a = AttackSpec(attack, params, wrap="surrogate" if surrogate is not None else None)
                        rec = evaluate(model, x, y, [spec_a], threat, batch_size=n,
                                       seed=runner.config.seed, surrogate=surrogate, progress=False)
                        entry["attacks"].append({"attack": attack, "eps": eps, "way": way,
                                                 "params": params, "clean": rec.clean.to_dict(),
                                                 "robust": rec.robust.to_dict()})
            rows.append(entry)
            if label == strip_from:
                strip = _transition_strip(model, Softened(model, temperature), x, y)
        return {"n": n, "rows": rows, "strip": strip}

    r = runner.cached_record(name, spec, compute)
    lines = [f"# Encoder + GMM classifier ({runner.config.dataset})", "",
             f"Per class a {k}-component full-covariance Gaussian mixture fitted by EM (torch) on "
             f"the VAE posterior means of {limit} training images; logits = log p(z|c) + log p(c). "
             f"Attacks: white-box L-inf on n = {r['n']} test images (accuracy % [Wilson 95%]); "
             f"PGD settings {pgd_settings}. `direct`: cross-entropy on the GMM's own logits; "
             "`BPDA (softened GMM)`: gradients of the same model with logits / T (same predictions; "
             "T brings the median top-2 logit gap on validation images to 5), so the loss does not "
             "saturate; `transfer`: crafted on the plain CNN, evaluated on the GMM pipeline.", ""]
    for entry in r["rows"]:
        lines += [f"## {entry['model']}: clean accuracy (full test set) {_fmt(entry['clean_full_test'])}, "
                  f"T = {entry['temperature']:.3g}", "",
                  "| attack | eps | direct (no BPDA) | BPDA (softened GMM) | transfer |", "|---|---|---|---|---|"]
        for eps in eps_list:
            for attack in ("fgsm", "pgd"):
                cells = [a for a in entry["attacks"] if a["attack"] == attack and a["eps"] == eps]
                by_way = {a["way"].split(" ")[0]: _fmt(a["robust"]) for a in cells}
                lines.append(f"| {attack.upper()} | {eps} | {by_way.get('direct', '-')} | "
                             f"{by_way.get('BPDA', '-')} | {by_way.get('transfer', '-')} |")
        lines.append(f"\nClean accuracy on the attacked subset: {_fmt(entry['attacks'][0]['clean'])}\n")
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    if r["strip"]:
        _render_strip(r["strip"], out / f"{name}_strip.png", strip_from)


def _transition_strip(model: nn.Module, stand_in: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      steps: int = 60, step_size: float = 0.01, frames: int = 8) -> dict:
    """Targeted L-inf gradient steps on one input toward another class; each frame's
    normalized class densities ``softmax(log p(z|c) + log p(c))``."""
    source = x[:1]
    target = int((y[0] + 5) % 10)
    t = torch.tensor([target], device=x.device)
    current = source.clone()
    keep = set(round(i * steps / (frames - 1)) for i in range(frames))
    images, probs, at = [], [], []
    for step in range(steps + 1):
        if step in keep:
            with torch.no_grad():
                probs.append(torch.softmax(model(current), 1)[0].tolist())
            images.append([[round(v, 3) for v in row] for row in current[0, 0].tolist()])
            at.append(step)
        current = current.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(stand_in(current), t)
            (g,) = torch.autograd.grad(loss, current)
        current = (current - step_size * g.sign()).clamp(0, 1).detach()
    return {"source_label": int(y[0]), "target_label": target, "steps": at, "images": images,
            "probabilities": probs, "step_size": step_size}


def _render_strip(strip: dict, path: Path, label: str) -> None:
    plt = _plt()
    count = len(strip["images"])
    fig, axes = plt.subplots(2, count, figsize=(count * 1.4, 3.0))
    for j in range(count):
        axes[0, j].imshow(strip["images"][j], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_xticks([])
        axes[0, j].set_yticks([])
        axes[0, j].set_title(f"step {strip['steps'][j]}", fontsize=7)
        p = strip["probabilities"][j]
        colors = ["C2" if c == strip["source_label"] else "C3" if c == strip["target_label"] else "0.6"
                  for c in range(len(p))]
        axes[1, j].bar(range(len(p)), p, color=colors)
        axes[1, j].set_ylim(0, 1)
        axes[1, j].set_xticks(range(len(p)))
        axes[1, j].tick_params(labelsize=5)
    fig.suptitle(f"{label} + GMM: L-inf steps of {strip['step_size']} from class "
                 f"{strip['source_label']} (green) toward {strip['target_label']} (red); bars: p(c|z)",
                 fontsize=8)
    fig.tight_layout()
    _save(fig, path)


