"""Differentially private training: privacy accounting, Poisson sampling, the DP-SGD step.

DP-SGD (Abadi et al. 2016) with Poisson sampling: at every step each of the N
training examples joins the batch independently with probability q (the
sample rate), every per-example gradient is clipped to norm C, and

.. math::
    \\tilde g = \\frac{1}{qN}\\Big(\\sum_{i \\in \\text{batch}} \\text{clip}_C(g_i)
    + \\mathcal{N}(0, \\sigma^2 C^2 I)\\Big).

The sum is divided by the *expected* batch size qN, not by the batch's own
size, as the accountants assume (the sensitivity of the sum is C whatever
the batch holds). A run of T such steps is the dp-accounting event
``SelfComposed(PoissonSampled(q, Gaussian(sigma)), T)``; :func:`epsilon` asks
Google's ``dp-accounting`` library for its epsilon at a delta (RDP by default,
converted to (epsilon, delta) by dp-accounting's RDP conversion, the tighter
one of Balle et al. 2020 / Canonne et al.; or the PLD accountant), and
:func:`noise_multiplier` for the smallest sigma that meets a target. No
accountant is written here.

Variable batch sizes without recompiling: every step's batch is padded to one
fixed size ``max_batch`` (:func:`max_batch_size`: the Binomial(N, q) quantile
exceeded with probability <= 1e-12 per step) and carries a mask. A padded row
is kept out of everything: its errors are zeroed before any norm, so it adds
nothing to a sum, a norm or a clip factor; the loss and accuracy are means over
the real rows; the noise scale is sigma C / (qN), fixed. If a draw ever
exceeded ``max_batch`` its surplus rows would be dropped: the step reports
``batch_size`` and :func:`poisson_batches` the overflow count.

``dp-accounting`` is an optional dependency (``pip install "jaxbp[privacy]"``);
the sampling and the gradient need only JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from jaxbp.types import PRNGKey, check_int, is_real

ACCOUNTANTS = ("rdp", "pld")
OVERFLOW_PROBABILITY = 1e-12
"""Per step, the chance a Poisson batch is larger than :func:`max_batch_size`."""
INSTALL_HINT = 'privacy accounting needs dp-accounting: pip install "jaxbp[privacy]"'


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return dp_accounting


def _check_rate(sample_rate: Any) -> float:
    if not is_real(sample_rate) \
            or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (the chance an example joins a "
                         f"step's batch), got {sample_rate!r}")
    return float(sample_rate)


def _check_delta(delta: Any) -> float:
    if not is_real(delta) \
            or not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_steps(steps: Any) -> int:
    return check_int("steps", steps, 1)


def _check_positive(name: str, value: Any) -> float:
    if not is_real(value) \
            or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_accountant(accountant: Any) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    return accountant


@contextlib.contextmanager
def _quiet_orders():
    """dp-accounting's RDP accountant logs a warning for each Renyi order whose series it
    cannot sum and then leaves that order out: epsilon stays an upper bound (a minimum over
    fewer orders), so the warnings are kept from the user's screen."""
    from absl import logging as absl_logging  # dp-accounting's own logger

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def _event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    dp = _dp_accounting()
    return dp.SelfComposedDpEvent(
        dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier)), steps)


Segment = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)``: a run of steps at one sigma and rate."""


def _checked_segments(segments: Any) -> tuple[Segment, ...]:
    """Each segment as (sigma > 0, q in (0, 1], steps >= 1), named by its index if not."""
    if isinstance(segments, str | bytes) or not hasattr(segments, "__iter__"):
        raise TypeError(f"segments must be a sequence of (noise_multiplier, sample_rate, "
                        f"steps), got {type(segments).__name__}")
    checked = []
    for i, segment in enumerate(segments):
        if not hasattr(segment, "__len__") or len(segment) != 3:
            raise ValueError(f"segments[{i}] must be (noise_multiplier, sample_rate, steps), "
                             f"got {segment!r}")
        try:
            sigma, rate, steps = segment
            checked.append((_check_positive("noise_multiplier", sigma), _check_rate(rate),
                            _check_steps(steps)))
        except (TypeError, ValueError) as err:
            raise type(err)(f"segments[{i}]: {err}") from None
    return tuple(checked)


def _composed(segments: tuple[Segment, ...]) -> Any:
    """One dp-accounting event: the segments composed in order."""
    events = [_event(*segment) for segment in segments]
    return events[0] if len(events) == 1 else _dp_accounting().ComposedDpEvent(events)


def _fresh(accountant: str) -> Any:
    dp = _dp_accounting()
    return dp.rdp.RdpAccountant() if accountant == "rdp" else _fresh_pld()


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """The epsilon of ``steps`` Poisson-sampled Gaussian steps at ``delta`` (dp-accounting).

    Args:
      noise_multiplier: sigma > 0 (the noise std over the clip norm).
      sample_rate: q in (0, 1], each example's chance to join a step's batch.
      steps: T >= 1.
      delta: in (0, 1).
      accountant: ``"rdp"`` (Renyi DP, dp-accounting's conversion to (eps, delta))
        or ``"pld"`` (privacy loss distributions; tighter, slower).
    """
    with _naming_the_order():
        sigma = _check_positive("noise_multiplier", noise_multiplier)
        rate, steps = _check_rate(sample_rate), _check_steps(steps)
        delta = _check_delta(delta)
    event = _event(sigma, rate, steps)
    acc = _fresh(_check_accountant(accountant))
    with _quiet_orders():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


def composed_epsilon(segments: Any, delta: float, accountant: str = "rdp") -> float:
    """The epsilon of runs of steps at different noise multipliers or rates, composed.

    A resumed private run whose sigma was re-calibrated spent its first steps at the old
    sigma: its epsilon is that of every segment taken, in order, not of all its steps at
    the new sigma. Composition only adds privacy loss, so a longer run never reports less.

    Args:
      segments: ``(noise_multiplier, sample_rate, steps)`` per segment (at least one).
      delta, accountant: as for :func:`epsilon`.
    """
    checked = _checked_segments(segments)
    if not checked:
        raise ValueError("segments must hold at least one (noise_multiplier, sample_rate, "
                         "steps)")
    delta = _check_delta(delta)
    acc = _fresh(_check_accountant(accountant))
    with _quiet_orders():
        acc.compose(_composed(checked))
        return float(acc.get_epsilon(delta))


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp", spent: Any = ()) -> float:
    """The smallest sigma whose ``steps`` Poisson-sampled steps spend at most ``target_epsilon``
    (after the ``spent`` segments, composed, when a resumed run has taken steps already).

    dp-accounting's ``calibrate_dp_mechanism`` (a bracketed search; the value
    returned meets the target, and sigma 1% smaller does not: RDP to 1e-4, PLD to
    0.1% of sigma).
    For ``"pld"`` the search is bracketed below the RDP solution (PLD never spends
    more than RDP at the same sigma), so no trial sigma is so small that its privacy
    loss distribution exhausts memory.

    Raises:
      ValueError: a bad argument, the ``spent`` segments already at or over the target,
        or the accountant failing (naming the setting).
    """
    with _naming_the_order():
        checked = (_check_positive("target_epsilon", target_epsilon), _check_delta(delta),
                   _check_rate(sample_rate), _check_steps(steps))
    return _calibrated(*checked, _check_accountant(accountant), _checked_segments(spent))


@contextlib.contextmanager
def _naming_the_order() -> Iterator[None]:
    """A bad positional argument of :func:`epsilon` or :func:`noise_multiplier` said with
    both orders: they differ (delta last, delta second), and a swap is the likely slip."""
    try:
        yield
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err} (the orders: epsilon(noise_multiplier, sample_rate, steps, "
                        f"delta), noise_multiplier(target_epsilon, delta, sample_rate, "
                        f"steps))") from None


@functools.lru_cache(maxsize=64)
def _calibrated(target: float, delta: float, rate: float, steps: int, accountant: str,
                prior: tuple[Segment, ...]) -> float:
    """:func:`noise_multiplier` of checked arguments, searched once per setting (a command
    line plans the run before :func:`jaxbp.fit` plans it again)."""
    dp = _dp_accounting()
    setting = (f"target_epsilon={target}, delta={delta}, sample_rate={rate}, steps={steps}, "
               f"accountant={accountant!r}" + (f", after {list(prior)}" if prior else ""))
    if prior:
        already = composed_epsilon(prior, delta, accountant)
        if already >= target:
            raise ValueError(f"the steps already taken spend epsilon {already:.4f}, at or over "
                             f"the target {target}: no noise multiplier lets more steps meet "
                             f"it ({setting})")

    def event(sigma: float) -> Any:
        return _composed((*prior, (sigma, rate, steps)))

    def calibrate(make_accountant: Callable[[], Any], bracket: Any, tol: float) -> float:
        try:
            with _quiet_orders():
                return float(dp.calibrate_dp_mechanism(
                    make_accountant, event, target, delta, bracket, tol=tol))
        except (MemoryError, ArithmeticError, RuntimeError, ValueError) as err:
            raise ValueError(f"noise calibration failed for {setting}: dp-accounting raised "
                             f"{type(err).__name__}: {err}") from None

    sigma_rdp = calibrate(lambda: _fresh("rdp"), dp.LowerEndpointAndGuess(1e-3, 1.0), 1e-4)
    if accountant == "rdp":
        return sigma_rdp
    # PLD's epsilon never exceeds RDP's at the same sigma, so its sigma is at most RDP's:
    # search below it, from a lower end that already overspends (never a hopeless, tiny
    # trial sigma whose loss distribution would not fit in memory). Each PLD trial
    # composes the whole run, so the search stops at 0.1% of sigma (a few trials).
    lower = 0.75 * sigma_rdp
    for _ in range(12):
        if _pld_epsilon(event(lower), lower, delta, setting) > target:
            break
        lower *= 0.75
    return calibrate(_fresh_pld, dp.ExplicitBracketInterval(lower, sigma_rdp),
                     1e-3 * sigma_rdp)


PLD_DISCRETIZATION = 1e-4
"""dp-accounting's value discretisation for the PLD accountant (its default)."""


def _fresh_pld() -> Any:
    return _dp_accounting().pld.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)


def _pld_epsilon(event: Any, sigma: float, delta: float, setting: str) -> float:
    try:
        acc = _fresh_pld()
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    except (MemoryError, ArithmeticError, RuntimeError, ValueError) as err:
        raise ValueError(f"noise calibration failed for {setting} at trial sigma {sigma:.4g}: "
                         f"dp-accounting raised {type(err).__name__}: {err}") from None


def max_batch_size(n: int, sample_rate: float,
                   overflow_probability: float = OVERFLOW_PROBABILITY) -> int:
    """The smallest m with P(Binomial(n, q) > m) <= ``overflow_probability`` (exact tail)."""
    rate = _check_rate(sample_rate)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be an int >= 1 (the number of examples), got {n!r}")
    n = int(n)
    if rate == 1:
        return n
    log_q, log_p = math.log(rate), math.log1p(-rate)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
               + k * log_q + (n - k) * log_p for k in range(n + 1)]
    tail = 0.0
    for m in range(n, -1, -1):        # tail = P(X > m - 1) once m's mass is added
        tail += math.exp(log_pmf[m])
        if tail > overflow_probability:
            return min(n, m)
    return 0


def poisson_batches(rng: np.random.Generator, n: int, sample_rate: float, steps: int,
                    max_batch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``steps`` Poisson batches of the rows ``0..n-1``, padded to ``max_batch``.

    Returns:
      ``(indices, masks, overflow)``: ``indices (steps, max_batch)`` int32 (row 0
      where padded), ``masks (steps, max_batch)`` bool (True for a sampled row),
      and how many sampled rows were dropped because a batch exceeded max_batch.
    """
    rate = _check_rate(sample_rate)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    for name, value, least in (("n", n, 1), ("steps", steps, 0), ("max_batch", max_batch, 1)):
        check_int(name, value, least)
    indices = np.zeros((steps, max_batch), np.int32)
    masks = np.zeros((steps, max_batch), bool)
    overflow = 0
    for t in range(steps):
        chosen = np.flatnonzero(rng.random(n) < rate)
        overflow += max(0, len(chosen) - max_batch)
        chosen = chosen[:max_batch]
        indices[t, :len(chosen)] = chosen
        masks[t, :len(chosen)] = True
    return indices, masks, overflow


def dp_gradient(clip_norm: float, noise_multiplier: float, expected_batch_size: float,
                key: PRNGKey) -> Callable[..., Any]:
    """Deprecated: ``jaxbp.sources.dp_sgd(clip_norm, noise_multiplier, key,
    expected_batch_size=...)``, the same source (this name goes next release)."""
    from jaxbp import sources, user_warnings

    user_warnings.warn("jaxbp.privacy.dp_gradient is deprecated: use jaxbp.sources.dp_sgd(..., "
                       "expected_batch_size=...) (the same gradient source)", DeprecationWarning)
    return sources.dp_sgd(clip_norm, noise_multiplier, key, expected_batch_size)


@dataclasses.dataclass(frozen=True)
class Privacy:
    """What :func:`jaxbp.fit` needs for a private run (``fit(..., privacy=Privacy(...))``).

    Give ``noise_multiplier`` (sigma), or ``target_epsilon`` and let fit calibrate
    sigma for the whole run before training; with both, sigma is used and
    training stops before an epoch that would spend more than the target.

    Attributes:
      clip_norm: C > 0, or one ``C_l > 0`` per layer with parameters (a sequence; as
        :func:`jaxbp.clipped_grad`'s per-layer norms, the noise then has
        ``C = sqrt(sum_l C_l^2)``); their count is checked against the net when the
        step is traced.
      delta: in (0, 1); 1e-5 default (use less than 1/N).
      target_epsilon: the budget, or None.
      noise_multiplier: sigma > 0, or None.
      accountant: ``"rdp"`` or ``"pld"``.
      microbatch: None (each padded Poisson batch runs whole), or m: only its sampled
        rows run, m at a time (:mod:`jaxbp.microbatch`; the same gradient, the padding
        nearly free; one device's: refused with a mesh). Not part of the run's
        identity: a run may resume with another.
    """

    clip_norm: float | tuple[float, ...] = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "rdp"
    microbatch: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.clip_norm, Sequence) and not isinstance(self.clip_norm, str):
            if not self.clip_norm:
                raise ValueError("clip_norm must be a number > 0 or one per layer with "
                                 "parameters, got an empty sequence")
            norms = tuple(_check_positive(f"clip_norm[{i}]", c)
                          for i, c in enumerate(self.clip_norm))
            object.__setattr__(self, "clip_norm", norms)
        else:
            _check_positive("clip_norm", self.clip_norm)
        _check_delta(self.delta)
        _check_accountant(self.accountant)
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise ValueError("Privacy needs target_epsilon or noise_multiplier (or both)")
        if self.target_epsilon is not None:
            _check_positive("target_epsilon", self.target_epsilon)
        if self.noise_multiplier is not None:
            _check_positive("noise_multiplier", self.noise_multiplier)
        check_int("microbatch", self.microbatch, 1, optional=True)
