"""How far a numerical recipe's hand-written gradient is from the float64 truth, beside
``jax.grad``'s of the same recipe: the check a bf16 run makes before it trains.

A recipe (:data:`jaxbp.layers.precision.RECIPES`) rounds by design, so a finite
difference or a Taylor test of its loss measures the rounding, not the derivative. What
can be judged is the distance of its gradient ``g`` from the truth ``g*`` (``jax.grad``
of the same network without the recipe, in float64, at the same point), normwise,

    err(g) = ||g - g*|| / ||g*||,

against what ``jax.grad`` of the same recipe's forward reaches: the hand-written gradient
passes when ``err(manual) <= max(1e-2, 2 err(jax.grad))`` (bf16 keeps 8 bits of
mantissa: about 4e-3 per rounding, a few roundings deep).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.autodiff import value_and_autodiff
from jaxbp.backprop import value_and_backprop
from jaxbp.types import ArrayLike, Params

RECIPE_TOLERANCE = 1e-2
"""The normwise error from the float64 truth a recipe's gradient may always have."""


class RecipeCheck(NamedTuple):
    """The normwise errors from the float64 truth of the hand-written gradient (``manual``)
    and of ``jax.grad`` of the same recipe (``autodiff``), and the ``tolerance`` the first
    is held to: ``max(RECIPE_TOLERANCE, 2 * autodiff)``."""

    manual: float
    autodiff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.manual <= self.tolerance)

    def summary(self) -> str:
        verdict = "OK" if self.ok else f"FAILED (above {self.tolerance:.1e})"
        return (f"manual {self.manual:.2e} from the float64 truth normwise, jax.grad of the "
                f"same recipe {self.autodiff:.2e}: {verdict}")


def _flat64(tree: Any) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(tree)])


def to_float64(a: ArrayLike) -> Any:
    """A float array in float64 (call with x64 on); integer labels and tokens unchanged."""
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.integer) else jnp.asarray(a.astype(np.float64))


def check_recipe(net: Any, exact_net: Any, params: Params, x: ArrayLike,
                 y: ArrayLike) -> RecipeCheck:
    """The recipe of ``net`` judged at (params, x, y) against the float64 truth.

    Args:
      net: the network in its recipe (``compute_dtype``/``activation_dtype`` set).
      exact_net: the same network without the recipe (the same params fit both): its
        float64 gradient by ``jax.grad``, with 64-bit JAX on for that call only, is the
        truth (independent of the hand-written rules, so a wrong rule cannot move it).
      params, x, y: the point (float32 params; x and y as the step gets them).

    Returns:
      A :class:`RecipeCheck` (``.ok``, ``.summary()``).
    """
    manual = value_and_backprop(net, params, x, y)[1]
    autodiff = value_and_autodiff(net, params, x, y)[1]
    with jax.enable_x64(True):
        truth = value_and_autodiff(exact_net, jax.tree.map(to_float64, params),
                                   to_float64(x), to_float64(y))[1]
        truth = _flat64(truth)
    scale = max(float(np.linalg.norm(truth)), np.finfo(np.float64).tiny)
    errors = [float(np.linalg.norm(_flat64(g) - truth)) / scale for g in (manual, autodiff)]
    return RecipeCheck(errors[0], errors[1], max(RECIPE_TOLERANCE, 2 * errors[1]))
