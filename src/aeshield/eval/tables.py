"""Tables from records (markdown or CSV), never typed by hand."""

from __future__ import annotations

import csv
import io

from ..records import EvalRecord


def records_table(records: list[EvalRecord], fmt: str = "markdown") -> str:
    header = ["defense", "classifier", "dataset", "threat", "attacks", "n", "clean", "robust"]
    rows = []
    for r in records:
        threat = f"{r.threat['norm']} eps={r.threat['eps']:g}"
        rows.append([r.defense, r.classifier, f"{r.dataset} ({r.data_source})", threat,
                     " -> ".join(a.name for a in r.attacks) or "none", str(r.n), r.clean.format(),
                     r.robust.format()])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\nAccuracies in % with Wilson 95% intervals."
