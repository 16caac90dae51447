"""Gradient analyses: S2SNet's gradient-map similarity (Table 1), DBP's smoothness (Jacobian
and reconstruction-loss gradient norms, Table 1) and attacks on the autoencoders themselves
(AUDDC, Figure 5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ...attacks.adaptive import other_class_targets
from ...attacks.autoencoder import autoencoder_attack, c_values
from ...defenses.base import Shielded
from ...defenses.dbp import jacobian_frobenius, recon_grad_penalty, reconstruction_error
from ...eval.auddc import auddc_batch
from ...eval.gradients import (ce_loss, gradient_map, label_ssim, pairwise_ssim, random_other_labels,
                               reconstruction_loss)
from ...io import write_text_atomic
from ...stats import mean_interval, paired_ratio_interval
from .base import AnalysisContext, AnalysisResult, MeanInterval, classifier_key, fmt_mean, pyplot, save_png, shield_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GradientSimilarityResult(AnalysisResult):
    n: int
    pairwise: dict[str, dict[str, MeanInterval]]  # SSIM between the gradient maps of two kinds
    true_vs_random_label: dict[str, MeanInterval]


@dataclass(frozen=True)
class SmoothnessResult(AnalysisResult):
    n: int
    n_jacobian: int
    rows: dict[str, dict[str, MeanInterval]]  # model label -> measure (SMOOTHNESS, RECONSTRUCTION)


@dataclass(frozen=True)
class AuddcResult(AnalysisResult):
    pairs: int
    auddc: dict[str, dict[str, MeanInterval]]  # model label -> attack mode -> AUDDC over pairs


GRADIENT_KINDS = ("classifier", "AE + classifier", "S2SNet + classifier", "S2SNet recon loss",
                  "AE recon loss")


def gradient_similarity(figure: dict, ctx: AnalysisContext) -> GradientSimilarityResult:
    """Mean SSIM between input-gradient magnitude maps (S2SNet Table 1) and across labels."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    name = figure.get("name", "s2s_gradients")
    clf_name, s2s, plain = figure["classifier"], figure["s2snet"], figure["plain"]
    n, shown = int(figure.get("n", 500)), int(figure.get("show", 4))
    spec = {"classifier": classifier_key(zoo, clf_name), "s2snet": shield_key(zoo, s2s),
            "plain": shield_key(zoo, plain), "n": n, "show": shown, "seed": config.seed}

    def compute() -> dict:
        classifier = zoo.classifier(clf_name)
        s_ae, p_ae = zoo.shield(s2s), zoo.shield(plain)
        test = data.test.subset(n, seed=config.seed + 17)
        x, y = test.images.to(zoo.device), test.labels.to(zoo.device)
        losses = {"classifier": ce_loss(classifier),
                  "AE + classifier": ce_loss(Shielded(p_ae, classifier)),
                  "S2SNet + classifier": ce_loss(Shielded(s_ae, classifier)),
                  "S2SNet recon loss": reconstruction_loss(s_ae),
                  "AE recon loss": reconstruction_loss(p_ae)}
        maps = {k: gradient_map(f, x, y) for k, f in losses.items()}
        y_other = random_other_labels(y, 10, torch.Generator().manual_seed(config.seed))
        labels = {k: label_ssim(losses[k], x, y, y_other) for k in GRADIENT_KINDS[:3]}
        pictures = {"input": x[:shown].squeeze(1).tolist(),
                    **{k: m[:shown].squeeze(1).tolist() for k, m in maps.items()}}
        pictures = {k: [[[round(v, 3) for v in row] for row in img] for img in imgs]
                    for k, imgs in pictures.items()}
        return {"n": n, "pairwise": pairwise_ssim(maps), "true_vs_random_label": labels,
                "maps": pictures}

    r = ctx.records.get(name, spec, compute)
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
        lines.append(f"| {k} | {fmt_mean(v)} |")
    table = write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = pyplot()
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
    picture = save_png(fig, out / f"{name}.png")
    pairwise = {a: {b: MeanInterval.from_dict(v) for b, v in row.items()} for a, row in r["pairwise"].items()}
    return GradientSimilarityResult(
        record=r, files=(table, picture), n=r["n"], pairwise=pairwise,
        true_vs_random_label={k: MeanInterval.from_dict(v) for k, v in r["true_vs_random_label"].items()})


SMOOTHNESS = ("jacobian_frobenius", "jacobian_frobenius_sq", "recon_loss_grad_norm", "recon_loss_grad_norm_sq")
RECONSTRUCTION = ("reconstruction_error", "reconstruction_distance")


def smoothness(figure: dict, ctx: AnalysisContext) -> SmoothnessResult:
    """||d x'/d x||_F (exact), ||d recon_loss / d x||_2 and the reconstruction error, per VAE.

    Each is reported in two units: the Jacobian as its norm and its square, the reconstruction
    error as the per-image sum of squares and as the L2 distance ``||x' - x||_2``. The DBP paper's
    Table 1 does not name its units; its magnitudes (docs/dev/history.md, session 11) fit the squared
    norm and the distance, while the norm and the sum of squares are what this table first
    reported. With two models, the second is compared with the first on the same images
    (ratios with paired bootstrap intervals)."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    name = figure.get("name", "dbp_smoothness")
    shields = dict(figure["shields"])
    n, n_jac = int(figure.get("n", 1000)), int(figure.get("n_jacobian", 100))
    # "measures" names the record's layout: records of the one-unit layout are recomputed.
    spec = {"shields": {k: shield_key(zoo, v) for k, v in shields.items()}, "n": n,
            "n_jacobian": n_jac, "seed": config.seed, "measures": 3}

    def compute() -> dict:
        test = data.test.subset(n, seed=config.seed + 19)
        x = test.images.to(zoo.device)
        rows, per_image = {}, {}
        for label, s in shields.items():
            vae = zoo.shield(s)
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
            seed = config.seed + 23
            # Smoothness: how many times smaller; reconstruction: how many times larger.
            comparison = {k: paired_ratio_interval(base[k], other[k], seed=seed) for k in SMOOTHNESS}
            comparison |= {k: paired_ratio_interval(other[k], base[k], seed=seed) for k in RECONSTRUCTION}
        return {"n": n, "n_jacobian": n_jac, "rows": rows, "comparison": comparison}

    r = ctx.records.get(name, spec, compute)
    labels = list(r["rows"])
    lines = [f"# DBP Table 1 layout: smoothness and reconstruction ({config.dataset})", "",
             f"Test images: n = {r['n']} (reconstruction error, gradient norm), n = {r['n_jacobian']} "
             "(exact Jacobian, one vector-Jacobian product per output pixel). Reconstruction of "
             "decode(mu). Cells: mean [95% interval of the mean] (sd).", "",
             "| model | ‖dx'/dx‖_F | ‖dx'/dx‖_F^2 | ‖d recon_loss/dx‖_2 | ‖d recon_loss/dx‖_2^2 | "
             "reconstruction error, sum of squares | reconstruction error, ‖x' - x‖_2 |",
             "|---|---|---|---|---|---|---|"]
    for label in labels:
        row = r["rows"][label]
        lines.append(f"| {label} | " + " | ".join(fmt_mean(row[k]) for k in SMOOTHNESS + RECONSTRUCTION) + " |")
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
    table = write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    rows = {label: {k: MeanInterval.from_dict(v) for k, v in row.items()} for label, row in r["rows"].items()}
    return SmoothnessResult(record=r, files=(table,), n=r["n"], n_jacobian=r["n_jacobian"], rows=rows)


def auddc_analysis(figure: dict, ctx: AnalysisContext) -> AuddcResult:
    """Output and latent attacks on each autoencoder over the same (original, target) pairs."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    name = figure.get("name", "dbp_auddc")
    shields = dict(figure["shields"])
    modes = list(figure.get("modes", ["output", "latent"]))
    pairs, count = int(figure.get("pairs", 20)), int(figure.get("c_count", 50))
    low, high = float(figure.get("c_low", 1e-3)), float(figure.get("c_high", 1e3))
    steps, lr = int(figure.get("steps", 300)), float(figure.get("lr", 0.01))
    shown, fig_c = int(figure.get("show", 4)), float(figure.get("figure_c", 1.0))
    spec = {"shields": {k: shield_key(zoo, v) for k, v in shields.items()}, "modes": modes,
            "pairs": pairs, "c": [count, low, high], "steps": steps, "lr": lr, "show": shown,
            "figure_c": fig_c, "seed": config.seed}

    def compute() -> dict:
        test = data.test.subset(pairs, seed=config.seed + 23)
        x, y = test.images.to(zoo.device), test.labels.to(zoo.device)
        x_t = other_class_targets(x, y)
        cs = c_values(count, low, high)
        pick = int((cs - fig_c).abs().argmin())
        results: dict[str, Any] = {}
        pictures: dict[str, Any] = {"original": x[:shown].squeeze(1).tolist(),
                                    "target": x_t[:shown].squeeze(1).tolist()}
        for label, s in shields.items():
            ae = zoo.shield(s)
            results[label] = {}
            for mode in modes:
                res = autoencoder_attack(ae, x, x_t, mode=mode, c=cs, steps=steps, lr=lr,
                                         generator=torch.Generator().manual_seed(config.seed))
                areas = auddc_batch(res.distortion, res.distance)
                results[label][mode] = {"auddc": mean_interval(areas), "per_pair": areas.tolist(),
                                        "distortion": res.distortion.tolist(), "distance": res.distance.tolist()}
                if mode == "output":
                    with torch.no_grad():
                        adv = res.x_adv[:shown, pick]
                        pictures[f"{label}: adversarial input"] = adv.squeeze(1).tolist()
                        pictures[f"{label}: its reconstruction"] = ae(adv).squeeze(1).tolist()
                        pictures[f"{label}: target reconstruction"] = ae(x_t[:shown]).squeeze(1).tolist()
                logger.info("auddc %s %s: %s", label, mode, fmt_mean(results[label][mode]["auddc"]))
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

    r = ctx.records.get(name, spec, compute)
    labels = list(r["results"])
    lines = [f"# Attacks on the autoencoders: AUDDC ({config.dataset}, {r['pairs']} "
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
        lines.append(f"| {label} | " + " | ".join(fmt_mean(r["results"][label][m]["auddc"]) for m in modes) + " |")
    if r["paired_difference"]:
        lines += ["", f"Paired difference {labels[1]} - {labels[0]} (same pairs): " + "; ".join(
            f"{m}: {fmt_mean(v)}" for m, v in r["paired_difference"].items())]
    table = write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    plt = pyplot()
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
    curves = save_png(fig, out / f"{name}_curves.png")
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
    picture = save_png(fig, out / f"{name}_figure5.png")
    auddc = {label: {m: MeanInterval.from_dict(v["auddc"]) for m, v in by_mode.items()}
             for label, by_mode in r["results"].items()}
    return AuddcResult(record=r, files=(table, curves, picture), pairs=r["pairs"], auddc=auddc)
