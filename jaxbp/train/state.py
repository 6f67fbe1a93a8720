"""The training state, and what a step checks of it and of its optimizer.

A :class:`TrainState` is everything that changes during training, one pytree; the
checks name a state, params or optimizer that is not what a step needs, before XLA.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxbp.types import Array, Params, check_not_deleted


class TrainState(NamedTuple):
    """Everything that changes during training, as one pytree.

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: the network parameters.
      opt_state: the optax optimizer's state.
    """

    step: Array
    params: Params
    opt_state: optax.OptState

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation) -> TrainState:
        """A step-0 state for ``params`` (a pytree of floating arrays) and any optax
        optimizer."""
        check_optimizer(optimizer)
        check_not_deleted("params", params)
        leaves = jax.tree.leaves(params)
        if not leaves or not all(jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
                                 for leaf in leaves):
            raise TypeError(f"params must be a pytree of floating arrays (net.init(key)), got "
                            f"{_describe_leaves(params, leaves)}")
        return _distinct_leaves(cls(jnp.zeros((), jnp.int32), params, optimizer.init(params)))


def _distinct_leaves(tree: Any) -> Any:
    """``tree`` with every array leaf its own object: a leaf met again is copied. A step
    takes its state donated, each leaf's buffer handed over once, and some optimizers'
    init returns one array in two places (optax.lbfgs: its two memories), which XLA
    refused ("Attempt to donate the same buffer twice")."""
    seen: set[int] = set()

    def own(leaf: Any) -> Any:
        if id(leaf) in seen and isinstance(leaf, jax.Array):
            return jnp.copy(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(own, tree)


def _describe_leaves(params: Any, leaves: list[Any]) -> str:
    if not leaves:
        return f"{type(params).__name__} with no arrays"
    kinds = sorted({str(jnp.result_type(leaf)) for leaf in leaves})
    return f"{type(params).__name__} of {len(leaves)} leaves of dtype {', '.join(kinds)}"


def check_not_donated(state: Any) -> None:
    """Before a step runs: a state already donated to an earlier step is named here, not
    left to XLA ("Buffer has been deleted or donated", after a log line of its own). One
    leaf is looked at per call, the step counter: donation deletes every leaf at once."""
    step = getattr(state, "step", None)
    if (isinstance(step, jax.Array) and not isinstance(step, jax.core.Tracer)
            and step.is_deleted()):
        check_not_deleted("state", state)


def guard_donation(jitted: Callable[..., Any]) -> Callable[..., Any]:
    """``jitted`` (a step or loop taking the state first) as users call it: a donated state
    is named before the call; ``lower``, ``trace`` and ``eval_shape`` are the jitted ones."""
    @functools.wraps(jitted)
    def call(state: Any, *args: Any, **kwargs: Any) -> Any:
        check_not_donated(state)
        return jitted(state, *args, **kwargs)

    for name in ("lower", "trace", "eval_shape"):
        setattr(call, name, getattr(jitted, name))
    return call


def check_state(state: Any) -> None:
    """A TypeError unless ``state`` is a :class:`TrainState` (checked when a step traces)."""
    if not isinstance(state, TrainState):
        raise TypeError(f"state must be a jaxbp.TrainState (TrainState.create(params, "
                        f"optimizer)), got {type(state).__name__}")


def check_opt_state(optimizer: optax.GradientTransformation, state: TrainState) -> None:
    """A ValueError unless ``state.opt_state`` has the form ``optimizer.init(state.params)``
    makes (traced, no FLOPs): a state created for another optimizer failed inside optax with
    an AttributeError on one of its fields, or trained on where the two forms agree."""
    try:
        expected = jax.eval_shape(optimizer.init, state.params)
    except Exception:  # an init that only runs eagerly (NumPy on the params): left unchecked
        return
    if jax.tree.structure(expected) != jax.tree.structure(state.opt_state):
        raise ValueError(f"state.opt_state does not fit the optimizer: the state holds "
                         f"{_outline(state.opt_state)}, the optimizer's init makes "
                         f"{_outline(expected)}; create the state with the optimizer the step "
                         f"is given (TrainState.create(params, optimizer))")
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected),
                                 jax.tree.leaves(state.opt_state), strict=True):
        if tuple(want.shape) != tuple(jnp.shape(got)):
            raise ValueError(f"state.opt_state{jax.tree_util.keystr(path)} has shape "
                             f"{tuple(jnp.shape(got))} but the optimizer's state for "
                             f"state.params has {tuple(want.shape)}: the params were replaced "
                             f"after the state was created")


def _outline(tree: Any) -> str:
    """A state's form by its nodes' class names: (ScaleByAdamState, EmptyState), 3 arrays."""
    def names(node: Any) -> str:
        if type(node) in (tuple, list):
            return "(" + ", ".join(names(child) for child in node) + ")"
        return type(node).__name__
    return f"{names(tree)} of {len(jax.tree.leaves(tree))} arrays"


def check_optimizer(optimizer: Any) -> None:
    """A TypeError unless ``optimizer`` has optax's ``init`` and ``update``."""
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (with init and "
                        f"update), got {type(optimizer).__name__}")


def takes_extra_args(optimizer: optax.GradientTransformation) -> bool:
    """Whether ``optimizer.update`` takes keyword arguments beyond (updates, state, params):
    optax's ``GradientTransformationExtraArgs`` protocol (a chain, MultiSteps), whose
    transformations read what they need (``value``) and ignore the rest."""
    try:
        parameters = inspect.signature(optimizer.update).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): plain
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def optimizer_update(optimizer: optax.GradientTransformation, grads: Any, state: TrainState,
                     extras: dict[str, Any], loss: Any, private: bool = False
                     ) -> tuple[Any, Any]:
    """``optimizer.update`` of ``grads``, with a source's ``extras`` (K-FAC's factors) and,
    for an optimizer that takes extra arguments, the batch loss as ``value`` (as optax's
    training loops pass it: ``reduce_on_plateau`` and ``polyak_sgd`` read it; the others
    ignore it, and their compiled step is unchanged). A ``private`` source's loss (DP-SGD
    privatises the gradient, not the loss) is never handed on.

    Raises:
      TypeError: an update that needs arguments no step has (a line search's ``value_fn``:
        ``optax.lbfgs()`` evaluates the loss and its gradient at trial params), named.
      ValueError: an optimizer that reads the loss, with a private source.
    """
    value = {"value": loss} if takes_extra_args(optimizer) and not private else {}
    try:
        return optimizer.update(grads, state.opt_state, state.params, **{**value, **extras})
    except TypeError as err:
        if "required keyword-only argument" not in str(err):
            raise
        if private and "'value'" in str(err):
            raise ValueError(f"the optimizer reads the batch loss ({err}), which DP-SGD does "
                             f"not make private: its updates would depend on the data "
                             f"beyond what the privacy accounting covers. Use an optimizer "
                             f"that reads the gradient only") from None
        raise TypeError(f"the optimizer's update needs arguments a train step does not hand "
                        f"it ({err}). A step gives the gradient, the params and the batch "
                        f"loss (value=); a line search (optax.lbfgs()'s zoom line search: "
                        f"value_fn, its loss at trial params) is not supported: use "
                        f"optax.lbfgs(learning_rate, linesearch=None), or another "
                        f"optimizer") from None


def check_extras_used(optimizer: optax.GradientTransformation, grads: Any, state: TrainState,
                      extras: dict[str, Any]) -> None:
    """A ValueError when a source hands the optimizer extra arguments it runs without: with
    ``grad=kfac_gradient()`` but no :func:`jaxbp.kfac_preconditioner` in the chain, optax
    drops the factors and the run is plain SGD/Adam that paid for them. Checked once per
    trace, by tracing ``update`` without them (no FLOPs; one that needs them raises)."""
    if not extras:
        return
    try:
        jax.eval_shape(lambda: optimizer.update(grads, state.opt_state, state.params))
    except Exception:  # any failure: the optimizer needs what it was handed
        return
    raise ValueError(f"the gradient source hands the optimizer {', '.join(sorted(extras))} "
                     f"(grad=jaxbp.kfac_gradient(): the K-FAC factors), but the optimizer "
                     f"runs without them, so they would be dropped: chain the preconditioner "
                     f"first, optax.chain(jaxbp.kfac_preconditioner(1e-3), optax.sgd(lr))")
