"""Re-render every committed table from its committed records with the current code.

A change to how cells are computed (an interval method, a pooling rule, a column kind) leaves
the committed ``docs/results/*/*/table.json`` files as the old code wrote them until each
target is re-published. This script says which tables are stale without training or attacking
anything: for each target and profile it reads the records the table was built from, computes
the cells as ``render_tables`` would, and compares their texts with the committed ones. Prints
one line per table (and the first differing cells) and exits 1 if any differs.

    .venv/bin/python scripts/check_tables.py [TARGET ...]

Rows chosen by a selection need the selection's committed records (``selection_*.json``); a
target whose selection would have to train something is reported as not checked. The
analyses' own files (AUDDC, smoothness, SSIM, curves) are not covered: they are recomputed
from the models, not from records.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aeshield.experiments.analyses.tables import table_cells
from aeshield.experiments.config import load_config
from aeshield.experiments.runner import Runner
from aeshield.records import EvalRecord

RESULTS = Path("docs/results")


def cells_from_records(target: str, profile: str) -> dict[tuple, str]:
    runner = Runner(load_config(target, profile), progress=False)
    if any(row.select for row in runner.config.rows):
        runner.resolve_selections()
    config = runner.config
    entries = []
    for row in config.rows:
        if row.label in runner.row_aliases:
            continue
        for group in config.groups:
            for classifier in group.classifiers:
                for suite in config.suites:
                    if suite.applies_to(row, classifier):
                        path = runner.record_path(row.label, classifier, suite.name)
                        entries.append({"row": row.label, "classifier": classifier, "suite": suite.name,
                                        "record": EvalRecord.load(path)})
    for alias, source in runner.row_aliases.items():
        entries += [{**e, "row": alias} for e in entries if e["row"] == source]
    return {(c["row"], c["group"], c["column"]): c["text"] for c in table_cells(config, entries)}


def main(targets: list[str]) -> int:
    stale = 0
    for table in sorted(RESULTS.glob("*/*/table.json")):
        target, profile = table.parts[-3], table.parts[-2]
        if targets and target not in targets:
            continue
        committed = {(c["row"], c["group"], c["column"]): c["text"]
                     for c in json.loads(table.read_text())["cells"]}
        try:
            current = cells_from_records(target, profile)
        except (OSError, KeyError, ValueError) as error:  # a record or selection missing
            print(f"{target}/{profile}: not checked ({type(error).__name__}: {error})")
            stale += 1
            continue
        differ = sorted(k for k in committed.keys() | current.keys() if committed.get(k) != current.get(k))
        print(f"{target}/{profile}: {len(committed)} cells, {len(differ)} differ")
        for key in differ[:5]:
            print(f"    {' | '.join(key)}: committed {committed.get(key)!r}, now {current.get(key)!r}")
        stale += bool(differ)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
