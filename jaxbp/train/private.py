"""The privacy book-keeping of a private run: its plan, and the epsilon its steps spent.

A run's steps form segments ``(sigma, q, steps)``: one per call of :func:`jaxbp.fit` (a
resumed run whose noise multiplier was recalibrated adds a segment). The epsilon
spent is the composition of all segments (:func:`jaxbp.privacy.composed_epsilon`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from jaxbp import sources, user_warnings

Segment = tuple[float, float, int]
"""``(sigma, q, steps)``: steps taken at noise multiplier sigma and sample rate q."""


def check_privacy(privacy: Any, grad: Any, mesh: Any) -> None:
    """A :class:`jaxbp.privacy.Privacy`, with ``grad`` left "backprop" (and, on a mesh,
    whole padded batches: no microbatch)."""
    if privacy is None:
        return
    from jaxbp.privacy import Privacy

    if not isinstance(privacy, Privacy):
        raise TypeError(f"privacy must be a jaxbp.privacy.Privacy, got {type(privacy).__name__}")
    if not (isinstance(grad, str) and grad == "backprop"):
        raise ValueError(f"privacy sets the gradient (clipped, noised per-example gradients): "
                         f"leave grad as 'backprop', got {grad!r}")
    if mesh is not None and privacy.microbatch is not None:
        raise ValueError(f"privacy's microbatch={privacy.microbatch} runs a batch's sampled "
                         f"rows together, m at a time, which a mesh keeps on different "
                         f"devices: on a mesh every device runs its share of the padded "
                         f"batch; pass Privacy(..., microbatch=None)")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A private run's sampling and noise: sample rate q, steps per epoch, sigma, the padded
    batch size, and the segments spent before this call."""

    privacy: Any
    rate: float
    steps_per_epoch: int
    sigma: float
    max_batch: int
    n_train: int
    spent: tuple[Segment, ...] = ()

    def gradient(self, key: jax.Array, recorded: bool = False) -> Any:
        """The DP-SGD source: Poisson batches of expected size ``q N``, clipped and noised.
        ``recorded=True``: the source as a run record describes it, without the
        microbatch (how the sampled rows run is not what is trained)."""
        return sources.dp_sgd(self.privacy.clip_norm, self.sigma, key,
                              expected_batch_size=self.rate * self.n_train,
                              microbatch=None if recorded else self.privacy.microbatch)

    def on_mesh(self, mesh: Any) -> Plan:
        """The plan with its padded batch rounded up to split over ``mesh``'s data axis and
        the processes (more padding, masked: the same gradient); as is without a mesh."""
        if mesh is None:
            return self
        from jaxbp.parallel import DATA

        split = math.lcm(mesh.shape[DATA], jax.process_count())
        return dataclasses.replace(self, max_batch=-(-self.max_batch // split) * split)

    def segments(self, steps_now: int) -> list[Segment]:
        """Every segment of the run after ``steps_now`` steps: this call's at its sigma."""
        now = steps_now - sum(segment[2] for segment in self.spent)
        return [*self.spent, *([(self.sigma, self.rate, now)] if now else [])]

    def epsilon(self, steps_now: int) -> float:
        """The epsilon spent after ``steps_now`` steps."""
        from jaxbp.privacy import composed_epsilon

        return composed_epsilon(self.segments(steps_now), self.privacy.delta,
                                self.privacy.accountant)

    def over_budget(self, steps_next: int, epoch: int) -> bool:
        """Whether running up to ``steps_next`` steps would pass the target epsilon (warned)."""
        if self.privacy.target_epsilon is None:
            return False
        spent = self.epsilon(steps_next)
        if spent <= self.privacy.target_epsilon * (1 + 1e-9):
            return False
        user_warnings.warn(f"private training stopped before epoch {epoch + 1}: it would "
                           f"spend epsilon {spent:.4f}, more than the target "
                           f"{self.privacy.target_epsilon}", RuntimeWarning)
        return True

    def describe(self, batch_size: int) -> str:
        """One line for the run's start."""
        p = self.privacy
        return (f"private training: sample rate {self.rate:.5f} (expected batch {batch_size}, "
                f"padded to {self.max_batch}"
                + (f"; its sampled rows run {p.microbatch} at a time" if p.microbatch else "")
                + f"), noise multiplier {self.sigma:.4f}, clip norm {p.clip_norm}, delta "
                f"{p.delta}, {p.accountant} accountant")


def plan(privacy: Any, n_train: int, batch_size: int, epochs: int,
         spent: tuple[Segment, ...] = (), first_epoch: int = 0) -> Plan:
    """The :class:`Plan`: sigma calibrated to the target if not given, for epochs
    ``first_epoch..epochs`` after the ``spent`` segments of a resumed run.

    Raises:
      ValueError: a ``batch_size`` (the expected Poisson batch) above ``n_train``; a given
        noise multiplier that spends more than the target epsilon in one epoch (nothing
        could be trained, resumed or not).
    """
    from jaxbp import privacy as dp

    if batch_size > n_train:
        raise ValueError(f"batch_size {batch_size} (the expected Poisson batch) is larger than "
                         f"the {n_train} training samples")
    rate = batch_size / n_train
    steps_per_epoch = max(1, round(n_train / batch_size))
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = dp.noise_multiplier(privacy.target_epsilon, privacy.delta, rate,
                                    max(1, (epochs - first_epoch) * steps_per_epoch),
                                    privacy.accountant, spent=spent)
    made = Plan(privacy, rate, steps_per_epoch, sigma, dp.max_batch_size(n_train, rate),
                n_train, spent)
    if privacy.noise_multiplier is not None and privacy.target_epsilon is not None:
        one_epoch = dataclasses.replace(made, spent=()).epsilon(steps_per_epoch)
        if one_epoch > privacy.target_epsilon * (1 + 1e-9):
            raise ValueError(f"noise_multiplier {sigma} spends epsilon {one_epoch:.4f} in one "
                             f"epoch ({steps_per_epoch} steps at sample rate {rate:.5f}), more "
                             f"than target_epsilon {privacy.target_epsilon}: nothing could be "
                             f"trained; raise the noise multiplier or the target, or give only "
                             f"the target (sigma calibrated to it)")
    return made


def spent_segments(metadata: dict[str, Any], steps: int, rate: float) -> tuple[Segment, ...]:
    """The segments a resumed private run has taken: as its checkpoint recorded them, or (a
    checkpoint from before segments were recorded) all its steps at the noise multiplier
    its run record names and this run's sample rate.

    Raises:
      ValueError: steps taken by a run that was not private.
    """
    if steps == 0:
        return ()
    if "privacy_segments" in metadata:
        return tuple((float(s), float(q), int(t)) for s, q, t in metadata["privacy_segments"])
    sigma = (metadata.get("run") or {}).get("noise_multiplier")
    if sigma is None:
        raise ValueError("the checkpoint to resume was not written by a private run (its "
                         "record names no noise multiplier): its steps' privacy cost is "
                         "unknown; use another checkpoint folder")
    return ((float(sigma), rate, int(steps)),)


def resumed(start: Plan, metadata: dict[str, Any], steps: int, batch_size: int, epochs: int,
            first_epoch: int) -> tuple[Plan, str | None]:
    """The plan for the rest of a resumed run, and a line saying so when sigma changed.

    The segments already spent join the plan; a run whose earlier steps ran at another
    sigma or q gets sigma recalibrated for the epochs left.
    """
    spent = spent_segments(metadata, steps, start.rate)
    if all(segment[:2] == (start.sigma, start.rate) for segment in spent):
        return dataclasses.replace(start, spent=spent), None
    again = plan(start.privacy, start.n_train, batch_size, epochs, spent, first_epoch)
    taken = ", ".join(f"{t} at sigma {s:.4f} (q {q:.5f})" for s, q, t in spent)
    return again, (f"noise multiplier {again.sigma:.4f} for the remaining steps: the "
                   f"{steps} steps taken ran at {taken}")
