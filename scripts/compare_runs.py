"""Compare two result trees written by ``aeshield reproduce --out A`` and ``--out B``.

Used to show that a refactor changed no measurement: every record and table JSON must be equal
once wall-clock fields are dropped, and every artifact's tensors bitwise equal. Prints one line
per difference and exits 1 if there is any.

    python scripts/compare_runs.py BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOLATILE = {"seconds", "peak_memory_mb", "timings", "created", "git_commit", "git_dirty", "command",
            "python", "platform", "packages", "versions", "hostname", "started", "finished", "wall_s"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensors(path: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    return {k: v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()
            for k, v in load_file(path).items()}


def compare(before: Path, after: Path) -> list[str]:
    problems = []
    names = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    names |= {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    for rel in sorted(names):
        a, b = before / rel, after / rel
        if rel.suffix in (".log", ".png", ".txt", ".md", ".ckpt", ".lock") or rel.name.endswith(".manifest.json") \
                or rel.name == "manifest.json":
            continue
        if not a.exists() or not b.exists():
            problems.append(f"only in {'after' if b.exists() else 'before'}: {rel}")
            continue
        if rel.suffix == ".json":
            if _strip(json.loads(a.read_text())) != _strip(json.loads(b.read_text())):
                problems.append(f"differs: {rel}")
        elif rel.suffix == ".safetensors":
            if _tensors(a) != _tensors(b):
                problems.append(f"tensors differ: {rel}")
        elif a.read_bytes() != b.read_bytes():
            problems.append(f"bytes differ: {rel}")
    return problems


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(found) if found else "identical (timings and manifests aside)")
    sys.exit(1 if found else 0)
