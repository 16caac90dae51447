"""Attack schedules for adversarial training, shared by AAA and Madry adversarial training.

One option, ``schedule``, chooses how each training step finds its adversarial examples:

- ``"pgd"`` (the default): Madry et al. (2018), a random start then ``attack_steps`` PGD steps
  per minibatch (``attack_steps + 1`` forward-backward passes per update).
- ``"fast"``: Wong, Rice and Kolter (2020), "Fast is better than free": FGSM from a uniform
  random start in the eps-ball, step ``alpha = fgsm_step_factor * eps`` (their rule:
  1.25 eps), then projected back to the ball and the pixel range; two passes per update.
- ``"nfgsm"``: de Jorge et al. (2022), "Make Some Noise": uniform noise of ``nfgsm_noise * eps``
  (their k = 2), then one FGSM step of ``nfgsm_step * eps`` (their alpha = eps), clipped to the
  pixel range but not to the eps-ball; two passes per update, like "fast".
- ``"free"``: Shafahi et al. (2019), "Adversarial Training for Free!": each minibatch is
  replayed ``replays`` times; one forward-backward per replay gives both the parameter gradient
  (one update of the model) and the input gradient, which moves the perturbation by ``eps``
  times its sign (their step), clipped to the ball and to the pixel range. The perturbation is
  carried across replays and across minibatches (zeros at the start). One pass per update, so
  an epoch costs ``replays`` passes per minibatch: divide ``epochs`` by ``replays`` to keep the
  cost of ``pgd``'s epochs in updates, as the paper does.

"free" ascends the training loss itself (that is what makes its gradient free): for AAA's
``xent`` it is the cross-entropy of ``F(G(x + delta))``, for ``mse`` and ``xent+mse`` the
perturbation also grows G's reconstruction error. It crafts in training mode, with the
function it updates (AAA's ``craft_mode`` applies to "pgd", "fast" and "nfgsm").

**Catastrophic overfitting.** FGSM training can collapse within an epoch: accuracy under FGSM
soars while accuracy under PGD falls to about 0 (Wong et al. 2020, section 5; the larger the
step, the sooner). ``OverfitGuard`` is the guard the issue asked for; it runs with both single-
step schedules and with "free" (one input gradient per update too; for free, ``guard_every``
counts minibatches, and a restore also drops the carried perturbation). It keeps Wong et al.'s
method unchanged and adds only a measurement (GradAlign, Andriushchenko and Flammarion 2020,
doubles the cost of a step with its double backpropagation). N-FGSM, the other remedy the issue
named, is the "nfgsm" schedule, so that the two can be compared. The guard runs after each epoch
(and, with ``guard_every``, every that many updates within it) a PGD check (``guard_steps``
steps, step ``2.5 eps / steps``, a fixed seed) on a fixed batch of ``guard_n`` images; when its
accuracy falls more than ``guard_drop`` below the best seen, the model and optimizer go back to
the last state that passed a check and the step factor (FGSM's, or free's perturbation step, eps
to begin with) is multiplied by ``guard_backoff``. Each epoch's record of the history carries
the end-of-epoch check (``guard_adv_acc``, ``guard_restored``, ``guard_step_factor``; with
``guard_every``, ``guard_restored`` counts the epoch's restores and ``guard_checks`` its
checks).

Why checks within the epoch: on MNIST at eps 0.3, FGSM training of the classifiers A and B
collapsed within the first of two epochs (PGD-40 accuracy 0.6% and 0.0%,
docs/dev/fast-training.md); a check after the epoch finds nothing good to go back to. On one-
or two-epoch budgets the guard needs ``guard_every`` (a few hundred updates: each check costs
``guard_steps + 1`` passes over ``guard_n`` images, per classifier for AAA).

Measured on MNIST at eps 0.3 (docs/dev/fast-training.md): N-FGSM's noise did not prevent the
collapse of B's training (PGD-40 x5 accuracy 0.0% with noise 1, 2 or 3 eps, unguarded); with
the guard checking every 200 updates it ended at 40%, where guarded "fast" ended at 0% and
PGD-3 at 80%. An AAA shield trained with it failed outright (a noise of 0.6 on MNIST leaves
little image to reconstruct): the method was designed for eps 8/255 on CIFAR-10.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping, Sequence

from dataclasses import dataclass

import torch
from torch import nn

from .. import distributed
from ..attacks.gradient import noisy_fgsm_train, pgd_train
from ..errors import ConfigError
from ..records import added_later
from ..threat import ThreatModel
from ..train.loop import check_precision

logger = logging.getLogger(__name__)

SCHEDULES = ("pgd", "free", "fast", "nfgsm")
SINGLE_STEP = ("fast", "nfgsm")
# The schedules the overfitting guard watches: the single-step ones and free, whose one input
# gradient per update bets, as FGSM's does, on a loss that is linear across the step.
GUARDED = (*SINGLE_STEP, "free")

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
    """The schedule settings of a trainer's config (``AAAConfig`` and
    ``AdversarialTrainingConfig`` inherit them; keyword-only, so the configs' positional order
    is unchanged). Declared ``records.added_later``: at their defaults they are in no artifact
    key, card or record key, so configs written before them read and hash the same.

    - ``schedule``: "pgd", "fast", "nfgsm" or "free" (see the module docstring);
    - ``replays``: free's m, updates per minibatch;
    - ``fgsm_step_factor``: fast's alpha / eps (Wong et al.: 1.25);
    - ``nfgsm_noise``, ``nfgsm_step``: nfgsm's noise and step as multiples of eps (de Jorge et
      al.: 2 and 1);
    - ``guard_drop``: the guard (single-step schedules and free) fires when PGD accuracy falls more than
      this (a fraction) below the best seen (None: no guard); ``guard_n`` images, ``guard_steps`` PGD steps;
      ``guard_backoff`` multiplies the step factor on each restore; ``guard_every``: also check
      every that many updates within an epoch (None: after each epoch only);
    - ``precision``: "float32" or "bfloat16" (mixed precision: each update's attack and loss
      under autocast, the weights and the optimizer in float32; ``train.loop.precision_context``).
    """

    schedule: str = added_later("pgd")
    replays: int = added_later(4)
    fgsm_step_factor: float = added_later(1.25)
    nfgsm_noise: float = added_later(2.0)
    nfgsm_step: float = added_later(1.0)
    guard_drop: float | None = added_later(0.2)
    guard_n: int = added_later(256)
    guard_steps: int = added_later(10)
    guard_backoff: float = added_later(0.75)
    guard_every: int | None = added_later(None)
    precision: str = added_later("float32")


def check_schedule(config) -> None:
    """The schedule settings of a trainer's config (``schedule``, ``replays``,
    ``fgsm_step_factor``, ``guard_*``); called from its ``__post_init__``."""
    name = type(config).__name__
    if config.schedule not in SCHEDULES:
        raise ConfigError(f"{name}: unknown schedule {config.schedule!r}; use one of {SCHEDULES}")
    if config.replays < 1:
        raise ConfigError(f"{name}: replays must be at least 1, got {config.replays}")
    if not config.fgsm_step_factor > 0:
        raise ConfigError(f"{name}: fgsm_step_factor must be positive, got {config.fgsm_step_factor}")
    if not (config.nfgsm_step > 0 and config.nfgsm_noise >= 0):
        raise ConfigError(f"{name}: nfgsm_step must be positive and nfgsm_noise at least 0, got "
                          f"{config.nfgsm_step} and {config.nfgsm_noise}")
    if config.guard_drop is not None and not 0 <= config.guard_drop <= 1:
        raise ConfigError(f"{name}: guard_drop is a fraction of accuracy in [0, 1] (or None: off), "
                          f"got {config.guard_drop}")
    if not 0 < config.guard_backoff <= 1:
        raise ConfigError(f"{name}: guard_backoff must lie in (0, 1], got {config.guard_backoff}")
    if config.guard_n < 1 or config.guard_steps < 1:
        raise ConfigError(f"{name}: guard_n and guard_steps must be at least 1")
    check_precision(config.precision, name)
    if config.guard_every is not None and config.guard_every < 1:
        raise ConfigError(f"{name}: guard_every counts updates between checks: at least 1, or None "
                          f"(after each epoch only), got {config.guard_every}")


def updates_per_batch(config) -> int:
    """Optimizer updates per minibatch: ``replays`` for "free", else 1 (lr schedules count them)."""
    return config.replays if config.schedule == "free" else 1


def guarded(config) -> bool:
    """Whether the overfitting guard runs: a single-step schedule or free, with a ``guard_drop``."""
    return config.schedule in GUARDED and config.guard_drop is not None


def step_factor(config) -> float:
    """The schedule's step as a multiple of eps (the guard lowers it from here): free's
    perturbation step is eps (Shafahi et al.), the single-step schedules' their config's."""
    if config.schedule == "free":
        return 1.0
    return config.nfgsm_step if config.schedule == "nfgsm" else config.fgsm_step_factor


def single_step(config, guard: OverfitGuard | None) -> dict:
    """``craft``'s single-step settings for a trainer: the guard's step factor once it runs
    (a restore lowers it), else the config's; nfgsm's noise."""
    return {"step_factor": guard.step_factor if guard is not None else step_factor(config),
            "noise_factor": config.nfgsm_noise}


def craft(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, schedule: str, threat: ThreatModel,
          step_size: float, steps: int, step_factor: float, generator: torch.Generator,
          noise_factor: float = 2.0) -> torch.Tensor:
    """The adversarial examples of one "pgd", "fast" or "nfgsm" training step (``free`` crafts
    inside ``FreeReplay.step``). "pgd" is ``pgd_train`` exactly as the trainers always called
    it (the same random draws); "fast" is the same random start and one step of
    ``step_factor * eps``, projected to the ball and the pixel range; "nfgsm" is noise of
    ``noise_factor * eps`` and one step of ``step_factor * eps``, not projected to the ball."""
    if schedule == "pgd":
        return pgd_train(model, x, y, threat=threat, step_size=step_size, steps=steps, generator=generator)
    if schedule == "fast":
        return pgd_train(model, x, y, threat=threat, step_size=step_factor * threat.eps, steps=1,
                         generator=generator)
    if schedule == "nfgsm":
        return noisy_fgsm_train(model, x, y, threat=threat, step_size=step_factor * threat.eps,
                                noise=noise_factor * threat.eps, generator=generator)
    raise ValueError(f"craft takes the 'pgd', 'fast' or 'nfgsm' schedule, got {schedule!r}")


class FreeReplay:
    """Shafahi et al.'s minibatch replay with the perturbation ``delta`` carried across replays
    and minibatches; checkpointed with the loop (``state_dict``), so a resumed run carries the
    same perturbation.

    ``step`` makes ``replays - 1`` updates itself and returns the loss of the last replay for
    the training loop's own update; that backward pass also gives ``delta`` its gradient, and
    the perturbation step it calls for is taken before the next replay (or the next checkpoint).
    """

    def __init__(self, replays: int, step_factor: Callable[[], float] = lambda: 1.0) -> None:
        self.replays = replays
        self.step_factor = step_factor  # the perturbation step / eps; the guard lowers it
        self.delta: torch.Tensor | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor, ThreatModel] | None = None  # (leaf, x, ball)
        self.updates = 0  # optimizer updates made by ``step`` itself, for tests and logs

    def _ascend(self, leaf: torch.Tensor, x: torch.Tensor, ball: ThreatModel) -> None:
        if leaf.grad is None:
            return
        assert self.delta is not None
        stepped = leaf.detach() + self.step_factor() * ball.eps * leaf.grad.sign()
        # Into the ball and the pixel box, as Wong et al.'s free code does: the next replay (or
        # minibatch) starts from a perturbation it can actually apply.
        self.delta[:x.shape[0]] = ball.project(x + stepped, x) - x

    def reset(self) -> None:
        """Start again from no perturbation (after the guard restored an earlier model: the
        carried perturbation was grown against the collapsed one)."""
        self.delta, self._pending = None, None

    def _settle(self) -> None:
        """Take the perturbation step of the last replay (its gradient came from the loop's backward)."""
        if self._pending is not None:
            self._ascend(*self._pending)
            self._pending = None

    def step(self, x: torch.Tensor, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
             threat: Callable[[], ThreatModel]) -> tuple[torch.Tensor, dict]:
        """Replay the minibatch ``x``: ``loss_fn(x_adv) -> (loss, metrics)`` runs the model (in
        training mode) and its outer loss; ``threat()`` is called before each update (it may set
        the lr of that update and return a ramped ball)."""
        self._settle()
        rows = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:]:
            self.delta = torch.zeros_like(x)
        elif self.delta.shape[0] < rows:
            pad = torch.zeros((rows - self.delta.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
            self.delta = torch.cat([self.delta.to(x.device), pad])
        self.delta = self.delta.to(x.device)
        for replay in range(self.replays):
            ball = threat()
            leaf = self.delta[:rows].clone().requires_grad_(True)
            raw = x + leaf
            # The projection's value with the identity's gradient: a clamp in the graph gives no
            # gradient to a pixel on the box's edge (0 at a black pixel with no perturbation),
            # so on MNIST, mostly black, the perturbation would never move there.
            loss, metrics = loss_fn(raw + (ball.project(raw, x) - raw).detach())
            if replay == self.replays - 1:
                self._pending = (leaf, x, ball)
                return loss, metrics
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._ascend(leaf, x, ball)
            optimizer.step()
            self.updates += 1
        raise AssertionError("unreachable")

    def state_dict(self) -> dict:
        """The perturbation of the whole global batch (under torchrun, gathered from the ranks'
        interleaved shares, so that a checkpoint resumes on any number of ranks)."""
        self._settle()
        if self.delta is None:
            return {"delta": torch.empty(0)}
        return {"delta": distributed.gather_rows(self.delta.detach()).cpu()}

    def load_state_dict(self, state: dict) -> None:
        delta = state["delta"]
        self.delta = distributed.my_rows(delta).clone() if delta.numel() else None
        self._pending = None


def guard_batch(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch of the guard's check: ``n`` images drawn with their own generator (so
    the training run's draws do not move)."""
    if x.shape[0] <= n:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].to(x.device)
    return x[idx], y[idx]


class OverfitGuard:
    """The catastrophic-overfitting guard of the "fast", "nfgsm" and "free" schedules (see the
    module docstring).

    ``models()`` gives the models whose accuracy is checked, in the mode to check them (AAA:
    ``Shielded(G, F_k)`` for each classifier, the mean accuracy counts); ``modules`` and
    ``optimizer`` are what a restore puts back, and ``on_restore`` (if set) is called after it.
    ``step_factor`` is the step factor the schedule reads; ``baseline()`` measures and keeps the
    starting state (call it on a fresh run, not a resumed one: the checkpoint restores the guard
    through ``state_dict``). With ``every``, the trainer calls ``tick()`` before each update's
    attack.
    """

    def __init__(self, models: Callable[[], Sequence[nn.Module]], modules: Mapping[str, nn.Module],
                 optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                 steps: int, drop: float, backoff: float, step_factor: float, every: int | None = None,
                 on_restore: Callable[[], None] | None = None) -> None:
        self.models, self.modules, self.optimizer = models, dict(modules), optimizer
        self.on_restore = on_restore
        self.x, self.y = x, y
        self.threat = ThreatModel("Linf", eps)
        self.steps, self.drop, self.backoff = steps, drop, backoff
        self.step_factor = step_factor
        self.every = every
        self.best = -math.inf
        self.restores = 0
        self.good: dict | None = None
        self.updates = 0  # updates ticked (with ``every``), checkpointed
        self._checked_at = 0  # ``updates`` at the last check
        self._epoch_checks = self._epoch_restores = 0

    def measure(self) -> float:
        """Mean accuracy of ``models()`` under PGD-``steps`` on the guard's batch (fixed seed)."""
        step_size = 2.5 * self.threat.eps / self.steps
        accs = []
        # In float32 even when ``tick`` runs it inside a mixed-precision step: a bfloat16 PGD is
        # weaker (docs/dev/fast-training.md), and the check must not flatter the model.
        with torch.autocast(self.x.device.type, enabled=False):
            for model in self.models():
                x_adv = pgd_train(model, self.x, self.y, threat=self.threat, step_size=step_size,
                                  steps=self.steps, generator=torch.Generator().manual_seed(2024))
                with torch.no_grad():
                    accs.append(float((model(x_adv).argmax(1) == self.y).float().mean()))
        return sum(accs) / len(accs)

    def _snapshot(self) -> None:
        self.good = {"modules": {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()},
                     "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _restore(self) -> None:
        assert self.good is not None
        taken = [s.get("step") for s in self.optimizer.state.values()]
        for k, m in self.modules.items():
            m.load_state_dict(self.good["modules"][k])
        self.optimizer.load_state_dict(copy.deepcopy(self.good["optimizer"]))
        # The moments go back, the update count does not: lr schedules that read it stay on time.
        for state, step in zip(self.optimizer.state.values(), taken):
            if step is not None and "step" in state:
                state["step"] = step.clone() if torch.is_tensor(step) else step
        if self.on_restore is not None:
            self.on_restore()

    def baseline(self) -> None:
        self.best = self.measure()
        self._snapshot()

    def tick(self) -> None:
        """Count the update about to be made; check first when ``every`` updates have passed
        since the last check (the record goes into the epoch's, see ``check``)."""
        if self.every and self.updates - self._checked_at >= self.every:
            self._check()
        self.updates += 1

    def check(self) -> dict:
        """The end-of-epoch check: restore and lower the step factor on a collapse. With
        ``every``, ``guard_restored`` counts the restores of the whole epoch and
        ``guard_checks`` its checks."""
        record = self._check()
        if self.every:
            record.update(guard_restored=float(self._epoch_restores), guard_checks=float(self._epoch_checks))
        self._epoch_checks = self._epoch_restores = 0
        return record

    def _check(self) -> dict:
        self._checked_at = self.updates
        self._epoch_checks += 1
        acc = self.measure()
        record = {"guard_adv_acc": acc, "guard_restored": 0.0}
        if self.good is not None and acc < self.best - self.drop:
            self._restore()
            self.step_factor *= self.backoff
            self.restores += 1
            self._epoch_restores += 1
            after = self.measure()
            logger.warning("catastrophic overfitting: PGD-%d accuracy %.3f, best %.3f; restored the last "
                           "good state (accuracy %.3f) and lowered the step factor to %.4g",
                           self.steps, acc, self.best, after, self.step_factor)
            record.update(guard_restored=1.0, guard_adv_acc_restored=after)
        else:
            self.best = max(self.best, acc)
            self._snapshot()
        record["guard_step_factor"] = float(self.step_factor)
        return record

    def state_dict(self) -> dict:
        return {"step_factor": torch.tensor(self.step_factor, dtype=torch.float64),
                "best": torch.tensor(self.best, dtype=torch.float64),
                "restores": torch.tensor(self.restores), "good": self.good or {},
                "updates": torch.tensor(self.updates), "checked_at": torch.tensor(self._checked_at)}

    def load_state_dict(self, state: dict) -> None:
        self.step_factor = float(state["step_factor"])
        self.best = float(state["best"])
        self.restores = int(state["restores"])
        self.good = state["good"] or None
        self.updates = int(state.get("updates", 0))  # checkpoints written before ``every``: none
        self._checked_at = int(state.get("checked_at", 0))


def schedule_state(config, models: Callable[[], Sequence[nn.Module]], modules: Mapping[str, nn.Module],
                   optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   x_val: torch.Tensor | None, y_val: torch.Tensor | None
                   ) -> tuple[FreeReplay | None, OverfitGuard | None]:
    """What a trainer carries for its schedule: the "free" replay state and the overfitting
    guard (checked on validation images when given, else on training images), each None when
    unused. A guarded free replay takes its step factor from the guard and starts from no
    perturbation after a restore."""
    free = FreeReplay(config.replays) if config.schedule == "free" else None
    if not guarded(config):
        return free, None
    gx, gy = guard_batch(*((x_val, y_val) if x_val is not None and y_val is not None else (x, y)),
                         config.guard_n, config.seed + 2)
    guard = OverfitGuard(models, modules, optimizer, gx, gy, eps=config.eps, steps=config.guard_steps,
                         drop=config.guard_drop, backoff=config.guard_backoff, step_factor=step_factor(config),
                         every=config.guard_every, on_restore=free.reset if free is not None else None)
    if free is not None:
        free.step_factor = lambda: guard.step_factor
    return free, guard


def warn_if_never_robust(history: Sequence[dict]) -> bool:
    """Warn when a guarded run ends robust to its own FGSM but not to the guard's PGD: the
    guard restores a state that once passed its check, so a run that never became robust
    under PGD (measured: FGSM training of MNIST classifiers at eps 0.3, from natural weights,
    with or without an eps ramp, step 0.75 or 1.25 eps) gets no help from it. Returns whether
    it warned."""
    last = history[-1] if history else {}
    pgd, fgsm = last.get("guard_adv_acc"), last.get("train_adv_acc")
    if pgd is None or fgsm is None or not (pgd < 0.05 and fgsm > pgd + 0.5):
        return False
    logger.warning("single-step training ended with %.1f%% accuracy under its own FGSM but %.1f%% under the "
                   "guard's PGD: catastrophic overfitting that the guard cannot undo (there was no robust "
                   "state to restore); train with schedule 'pgd' (a few steps, e.g. attack_steps 3) instead",
                   100 * fgsm, 100 * pgd)
    return True


def combine(*fns: Callable[[], dict] | None) -> Callable[[], dict] | None:
    """One end-of-epoch function running each given one in order and merging their records."""
    present = [f for f in fns if f is not None]
    if not present:
        return None

    def run() -> dict:
        out: dict = {}
        for f in present:
            out.update(f())
        return out
    return run
