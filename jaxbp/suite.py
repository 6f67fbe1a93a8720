"""The verification suite: random MLPs x activations x losses x dtypes through verify_grads.

Every hidden activation meets every loss in every dtype asked for; each case
draws its own depth, widths, batch, output activation and data from a seeded
NumPy generator, so a run is reproducible from ``seed``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp._typing import Array, ArrayLike, Params
from jaxbp.activations import ACTIVATIONS
from jaxbp.backprop import value_and_backprop
from jaxbp.losses import LOSSES
from jaxbp.mlp import MLP
from jaxbp.verify import GradReport, verify_grads

DTYPES = ("float64", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Case:
    """One suite case: a network, its data and the PRNG seed of its params."""

    net: MLP
    batch: int
    seed: int
    label_targets: bool

    def describe(self) -> str:
        """``sizes act->out_act loss dtype`` on one line."""
        hidden = ",".join(dict.fromkeys(self.net.hidden_activations)) or "-"
        labels = " (int labels)" if self.label_targets else ""
        return (f"{'x'.join(map(str, self.net.sizes)):<18} B={self.batch:<3} "
                f"{hidden:>10}->{self.net.output_activation:<10} {self.net.loss}{labels}")


def random_cases(
    seed: int = 0,
    dtypes: Sequence[str] = DTYPES,
    max_depth: int = 4,
    max_width: int = 16,
    max_batch: int = 16,
) -> Iterator[Case]:
    """Every (activation, loss, dtype) once, each with a random architecture.

    Depth (weight layers) in ``[1, max_depth]``, widths in ``[1, max_width]``,
    batch in ``[1, max_batch]``; the output activation is drawn from all
    activations for ``squared_error`` and is ``identity`` half the time for the
    cross-entropies (logits), otherwise any other.
    """
    rng = np.random.default_rng(seed)
    names = sorted(ACTIVATIONS)
    for dtype in dtypes:
        for activation in names:
            for loss in sorted(LOSSES):
                depth = int(rng.integers(1, max_depth + 1))
                widths = rng.integers(1, max_width + 1, size=depth + 1)
                if loss == "softmax_cross_entropy":
                    widths[-1] = max(int(widths[-1]), 2)
                out = str(rng.choice(names)) if (loss == "squared_error" or rng.random() < 0.5) \
                    else "identity"
                net = MLP(tuple(int(w) for w in widths), activation, out, loss, dtype)
                labels = loss == "softmax_cross_entropy" and bool(rng.random() < 0.5)
                yield Case(net, int(rng.integers(1, max_batch + 1)),
                           int(rng.integers(2**31)), labels)


def case_data(case: Case) -> tuple[tuple[dict[str, Array], ...], Array, Array]:
    """Params, x and y for a case, all drawn from ``case.seed``."""
    key_p, key_x, key_y = jax.random.split(jax.random.key(case.seed), 3)
    net, dtype = case.net, jnp.dtype(case.net.dtype)
    n_in, n_out = net.sizes[0], net.sizes[-1]
    x = jax.random.normal(key_x, (case.batch, n_in), dtype)
    if case.label_targets:
        y = jax.random.randint(key_y, (case.batch,), 0, n_out)
    elif net.loss == "squared_error":
        y = jax.random.normal(key_y, (case.batch, n_out), dtype)
    elif net.loss == "sigmoid_cross_entropy":
        y = jax.random.uniform(key_y, (case.batch, n_out), dtype)
    else:
        y = jax.nn.softmax(jax.random.normal(key_y, (case.batch, n_out)) * 2).astype(dtype)
    return net.init(key_p), x, y


def run_case(case: Case, n_fd: int = 2) -> GradReport:
    """verify_grads of the hand-written gradient of one case (needs x64 for float64)."""
    params, x, y = case_data(case)
    return verify_mlp(case.net, params, x, y, n_fd=n_fd)


def verify_mlp(
    net: MLP, params: Params, x: ArrayLike, y: ArrayLike, n_fd: int = 2, float64: bool = False
) -> GradReport:
    """verify_grads of ``backprop`` against ``jax.grad`` of ``net.cost`` at (params, x, y).

    With ``float64=True`` params, x and float targets are converted to float64
    and the check runs with 64-bit JAX switched on for its duration only: the
    same network and data, checked where FD and the Taylor test are sharp
    (a float32 FD step along a random direction crosses ReLU kinks of a wide net).
    """
    def grad_fn(p, x, y):
        return value_and_backprop(net, p, x, y)[1]

    if not float64:
        return verify_grads(grad_fn, jax.jit(net.cost), params, x, y, n_fd=n_fd)
    with jax.enable_x64(True):
        to64 = lambda a: jnp.asarray(np.asarray(a).astype(np.float64))  # noqa: E731
        y = y if np.ndim(y) == 1 else to64(y)
        return verify_grads(grad_fn, jax.jit(net.cost), jax.tree.map(to64, params),
                            to64(x), y, n_fd=n_fd)
