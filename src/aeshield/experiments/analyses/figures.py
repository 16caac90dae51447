"""Pictures of what a shield does to its inputs: the AAA paper's reconstructions (Table 3) and
PuVAE's class-conditional reconstructions of a clean and an adversarial input (Figure 6)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...attacks import pgd
from ...defenses.base import Shielded
from ...attacks import run_attack
from ...eval.harness import adapt_model
from ...threat import ThreatModel
from .base import AnalysisContext, AnalysisResult, attack_at, data_label, pipeline_key, pyplot, save_png

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figure6Result(AnalysisResult):
    true_label: int
    chosen: dict[str, int]  # input ("clean", "adversarial") -> class whose reconstruction PuVAE selects
    pipeline_label: dict[str, int]  # input -> the pipeline's output (-1: rejected)


def reconstructions_figure(figure: dict, ctx: AnalysisContext) -> AnalysisResult:
    """Table 3 of the AAA paper: inputs next to each shield's reconstructions."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    n = int(figure.get("n", 8))
    test = data.test.subset(n, seed=config.seed + 7)
    classifier = zoo.classifier(figure["classifier"])
    attack_shield = zoo.shield(figure["attack_through"]) if figure.get("attack_through") else None
    model = Shielded(attack_shield, classifier) if attack_shield is not None else classifier
    settings = figure.get("attack", {"eps": 0.3, "step_size": 0.01, "steps": 40})
    x_adv = pgd(model, test.images, test.labels, **settings)
    rows = [("clean input", test.images), ("adversarial input", x_adv)]
    for label, name in figure["shields"].items():
        with torch.no_grad():
            rows.append((f"{label}: G(adv)", zoo.shield(name)(x_adv)))
    fig, axes = pyplot().subplots(len(rows), n, figsize=(n * 1.1, len(rows) * 1.2))
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            img = images[c].detach().cpu()
            ax.imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    attack = f"PGD L-inf eps={settings.get('eps')} steps={settings.get('steps')}"
    through = f" through {figure.get('attack_through')} + {figure['classifier']}" if attack_shield is not None else ""
    fig.suptitle(f"{config.dataset}: {attack}{through}", fontsize=8)
    fig.tight_layout()
    return AnalysisResult(record=None, files=(save_png(fig, out / figure.get("file", "reconstructions.png")),))


def figure6(figure: dict, ctx: AnalysisContext) -> Figure6Result:
    """A clean input and its adversarial version, each with its N class-conditional
    reconstructions; the one PuVAE selects (smallest RMSE) is framed."""
    config, data, zoo, out = ctx.config, ctx.data, ctx.zoo, ctx.out
    shield, classifier = figure["shield"], figure["classifier"]
    index = int(figure.get("index", 0))
    attack = figure.get("attack", {"name": "pgd", "wrap": "classifier",
                                   "params": {"steps": 40, "step_size": 0.01}})
    eps = float(figure.get("eps", 0.3))
    spec = {"model": pipeline_key(zoo, shield, classifier), "index": index, "attack": attack, "eps": eps,
            "seed": config.seed}

    def compute() -> dict:
        model = zoo.shield_pipeline(shield, classifier)
        test = data.test.subset(index + 1, seed=config.seed + 11)
        x, y = test.images[index:index + 1], test.labels[index:index + 1]
        a = attack_at(attack, eps)
        gen = torch.Generator().manual_seed(config.seed)
        x_adv = run_attack(a.name, adapt_model(model, a), x, y, ThreatModel("Linf", eps), gen, **a.params)
        panels = []
        for name, inp in (("clean", x), ("adversarial", x_adv)):
            with torch.no_grad():
                torch.manual_seed(config.seed)
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

    record = ctx.records.get(figure.get("record", "figure6"), spec, compute)
    plt = pyplot()
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
    fig.suptitle(f"{data_label(config, data.test)}: true label {record['true_label']}; {record['attack']} at eps "
                 f"{record['eps']}; titles: class, RMSE; red = selected (min RMSE)"
                 + (f"; reject if min RMSE > {t:.3f}" if t is not None else ""), fontsize=7)
    fig.tight_layout()
    picture = save_png(fig, out / figure.get("file", "figure6_reconstructions.png"))
    return Figure6Result(record=record, files=(picture,), true_label=record["true_label"],
                         chosen={p["input"]: p["chosen"] for p in panels},
                         pipeline_label={p["input"]: p["pipeline_label"] for p in panels})
