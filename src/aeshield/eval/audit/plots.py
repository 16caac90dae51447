"""The audit's plots: accuracy vs eps (with the cascade's bars) and accuracy vs steps."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .report import AuditReport, accuracy_of


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_eps(path: Path, report: AuditReport) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    curve = report.sweeps.get("eps", [])
    if curve:
        xs = [p["eps"] for p in curve]
        acc = [accuracy_of(p["accuracy"]) for p in curve]
        ys = [100 * a.value for a in acc]
        lo = [100 * (a.value - a.interval[0]) for a in acc]
        hi = [100 * (a.interval[1] - a.value) for a in acc]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label="reference PGD alone")
    unb = report.sweeps.get("unbounded")
    if unb:
        a = accuracy_of(unb["accuracy"])
        ax.plot([unb["eps"]], [100 * a.value], "kx", label=f"unbounded eps={unb['eps']:g}")
    r = report.robust
    ax.errorbar([report.threat.eps], [100 * r.value],
                yerr=[[100 * (r.value - r.interval[0])], [100 * (r.interval[1] - r.value)]],
                fmt="r*", markersize=12, capsize=3, label="worst case, all attacks")
    ax.axvline(report.threat.eps, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"eps ({report.threat.norm.value})")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title("accuracy vs eps")
    ax.legend(fontsize=8)
    names = ["clean"] + [a.name for a in report.record.attacks]
    vals = [100 * report.record.clean.value] + [100 * a.accuracy_after.value for a in report.record.attacks]
    colors = ["tab:green"] + ["tab:blue"] * (len(names) - 1)
    if report.check_attacks:
        names.append("+ the checks' attacks")
        vals.append(100 * r.value)
        colors.append("tab:red")
    bars.barh(range(len(names)), vals, color=colors)
    bars.set_yticks(range(len(names)), names, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(0, 100)
    bars.set_xlabel(f"accuracy after each attack (%), cascade at eps={report.threat.eps:g}")
    _save_figure(fig, path)


def plot_steps(path: Path, report: AuditReport) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    curve = report.sweeps.get("steps", [])
    if curve:
        xs = [p["steps"] for p in curve]
        acc = [accuracy_of(p["accuracy"]) for p in curve]
        ax.errorbar(xs, [100 * a.value for a in acc],
                    yerr=[[100 * (a.value - a.interval[0]) for a in acc],
                          [100 * (a.interval[1] - a.value) for a in acc]],
                    marker="o", capsize=3, label="reference PGD alone")
    longer = report.sweeps.get("longer")
    if longer:
        for key, style, label in (("short", "bs", "normal length"), ("long", "r^", "10x longer")):
            a = accuracy_of(longer[key]["accuracy"])
            ax.plot([longer[key]["steps"]], [100 * a.value], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("attack steps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(f"accuracy vs steps at eps={report.threat.eps:g}")
    ax.legend(fontsize=8)
    _save_figure(fig, path)
