"""Several processes on torch.distributed (gloo, two CPU ranks started by torchrun) give what
one process gives: the same evaluation and audit records, the same AAA weights (float64, a
shield without BatchNorm; Madry AT, a classifier, MagNet and DBP too), a killed rank ends the
job instead of hanging it, and its checkpoint resumes on one or two ranks to the weights of an
uninterrupted run; reproduce spreads its jobs and cells over the ranks and renders the table
of one process.

The scenarios are in ``distributed_worker.py``; every launch has one thread per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aeshield import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _launch(scenario: str, out: Path, *, ranks: int, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    command = (TORCHRUN if ranks == 2 else [sys.executable]) + [str(WORKER), scenario, str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment.pop("WORLD_SIZE", None)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def _run(scenario: str, out: Path, *, ranks: int, **env) -> dict:
    done = _launch(scenario, out, ranks=ranks, **env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == ranks
    return result


def _weights(result: dict, which: str = "weights") -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in result[which].items()}


def _max_difference(a: dict, b: dict, which: str = "weights") -> float:
    wa, wb = _weights(a), _weights(b, which)
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def one_process_aaa(tmp_path_factory) -> dict:
    return _run("aaa", tmp_path_factory.mktemp("aaa1") / "out.json", ranks=1)


def test_evaluation_and_audit_records_match_one_process(tmp_path):
    one = _run("evaluate", tmp_path / "one.json", ranks=1)
    two = _run("evaluate", tmp_path / "two.json", ranks=2)
    # Not trivial: the attacks fooled some examples and left others, on both pipelines.
    for name in ("plain", "noisy"):
        assert 0 < one[name]["robust"]["correct"] < one[name]["clean"]["correct"]
    assert one["plain"] == two["plain"]
    assert one["noisy"] == two["noisy"]  # a random pipeline: its draws are seeded per batch
    assert one["audit"]["robust_flags"] == two["audit"]["robust_flags"]
    assert one["audit"]["record"] == two["audit"]["record"]
    assert one["audit"]["checks"] == two["audit"]["checks"]
    assert one["audit"]["sweeps"] == two["audit"]["sweeps"]


def test_aaa_on_two_ranks_matches_one_process_with_the_global_batch(tmp_path, one_process_aaa):
    two = _run("aaa", tmp_path / "two.json", ranks=2)
    assert two["steps"] == one_process_aaa["steps"] == 18
    assert _max_difference(one_process_aaa, two) < 1e-8
    # and the steps did move the weights: the match is not that of two untouched shields
    assert _max_difference(one_process_aaa, one_process_aaa, "initial") > 1e-3


def test_every_trainer_kind_on_two_ranks_matches_one_process(tmp_path):
    """Madry AT on the "free" schedule, an augmented classifier (SGD), a MagNet autoencoder and a
    DBP VAE (a double backward), float64: the per-example draws, the updates made inside a step
    and the carried perturbation all follow the global batch."""
    one = _run("trainers", tmp_path / "one.json", ranks=1)["trainers"]
    two = _run("trainers", tmp_path / "two.json", ranks=2)["trainers"]
    assert one.keys() == two.keys() and len(one) == 4
    for name in one:
        assert _max_difference({"weights": one[name]}, {"weights": two[name]}) < 1e-8, name


@pytest.mark.parametrize("resume_ranks", [1, 2])
def test_a_killed_rank_ends_the_job_and_its_checkpoint_resumes_on_any_number_of_ranks(
        tmp_path, one_process_aaa, resume_ranks):
    checkpoint = tmp_path / "aaa.pt"
    start = time.monotonic()
    # Rank 1 dies (SIGKILL) in the 6th step, after the checkpoint of step 4.
    killed = _launch("aaa", tmp_path / "killed.json", ranks=2, timeout=120, DIE_AT="21",
                     CHECKPOINT=str(checkpoint))
    elapsed = time.monotonic() - start
    assert killed.returncode != 0
    assert elapsed < 60, f"the job took {elapsed:.0f}s to end after a rank died"
    assert not (tmp_path / "killed.json").exists() and checkpoint.exists()
    assert torch.load(checkpoint, weights_only=True)["state"]["steps"] == 4

    done = _launch("aaa", tmp_path / "resumed.json", ranks=resume_ranks, CHECKPOINT=str(checkpoint))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "step 4" in done.stderr
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["steps"] == 18
    assert _max_difference(one_process_aaa, resumed) < 1e-8


def test_reproduce_spreads_its_jobs_and_cells_over_the_ranks(tmp_path):
    from test_runner import TINY

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _run("reproduce", tmp_path / "one" / "out.json", ranks=1, CONFIG=str(config))
    done = _launch("reproduce", tmp_path / "two" / "out.json", ranks=2, CONFIG=str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "out.json").read_text())
    assert two["table"] == one["table"]  # the same cells, whichever rank measured each
    # every artifact trained once, every cell measured once, over the two ranks together
    assert two["timings"] == one["timings"]
    assert len([k for k in two["timings"] if k.startswith("eval")]) == 3
    # and both ranks had work: the first level's two training jobs went to different ranks
    level = next(line for line in done.stderr.splitlines() if "level 1:" in line)
    assert "rank 0: " in level and "rank 1: " in level and "rank 1: nothing" not in level


def test_reproduce_trains_a_selections_candidates_on_both_ranks_before_choosing(tmp_path):
    from test_selection import _with_selection

    config = tmp_path / "select.json"
    config.write_text(json.dumps(_with_selection()))
    done = _launch("reproduce", tmp_path / "out.json", ranks=2, CONFIG=str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    # The first plan is the selection's training: C, then its two candidates, one per rank.
    level = next(line for line in done.stderr.splitlines() if "level 1:" in line)
    assert "shield:s" in level and "shield:s2" in level and "rank 1: nothing" not in level
    chosen = next(c for c in json.loads((tmp_path / "out.json").read_text())["table"]
                  if c["row"] == "chosen")
    assert chosen["n"] == 40


def test_one_process_is_a_world_of_one():
    world = distributed.world()
    assert (world.rank, world.size, world.main, world.distributed) == (0, 1, True, False)
    assert list(distributed.my_batches(3)) == [0, 1, 2]
    flags = torch.tensor([True, False])
    assert distributed.all_and(flags) is flags
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    with distributed.alone():
        assert not distributed.world().distributed


def test_a_process_group_that_aeshield_did_not_join_is_left_alone(monkeypatch):
    """A program with its own process group that evaluates on rank 0 only must not have
    aeshield wait for the other ranks: only ``init`` makes aeshield share its work."""
    import torch.distributed as dist

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name, value in (("is_initialized", True), ("get_world_size", 2), ("get_rank", 1),
                        ("get_backend", "gloo")):
        monkeypatch.setattr(dist, name, lambda value=value: value)
    assert not distributed.world().distributed
    monkeypatch.setattr(distributed, "_joined", True)
    assert distributed.world() == distributed.World(1, 2, 0, "gloo")


def test_per_example_draws_follow_the_global_batch(monkeypatch):
    """Rank r of W draws the rows r, r + W, ... of what one process draws for the whole batch,
    and its generator ends where one process's does."""
    full_gen, one = torch.Generator().manual_seed(4), None
    one = torch.rand(6, 3, generator=full_gen)
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank, 2))
        gen = torch.Generator().manual_seed(4)
        with distributed.global_batch(6):
            mine = distributed.rows_rand((3, 3), gen)
        assert torch.equal(mine, one[rank::2])
        assert torch.equal(gen.get_state(), full_gen.get_state())
        # a draw of another shape (not one row per example of the step) is drawn as asked
        with distributed.global_batch(6):
            assert distributed.rows_rand((4,), torch.Generator().manual_seed(0)).shape == (4,)


def test_batch_seeds_differ_from_the_attack_generators_seeds():
    from aeshield.eval.harness import attack_generator

    seeds = {distributed.batch_seed(0, i, b) for i in range(-1, 5) for b in range(50)}
    assert len(seeds) == 6 * 50
    assert attack_generator(0, 0, 0).initial_seed() not in seeds
