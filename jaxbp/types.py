"""Type aliases shared by every module (one place, as the house style asks)."""

from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
ArrayLike: TypeAlias = jax.typing.ArrayLike
Layer: TypeAlias = dict[str, Array]
"""One dense layer's parameters: ``{"w": (fan_in, fan_out), "b": (fan_out,)}``."""
Params: TypeAlias = tuple[Layer, ...]
"""An MLP's parameters, one :data:`Layer` per weight layer, input side first."""
PyTree: TypeAlias = Any
PRNGKey: TypeAlias = jax.Array


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool (``Conv2D(np.int64(3))`` is a kernel of 3)."""
    import numpy as np

    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """A Python or NumPy integer or float, not a bool."""
    import numpy as np

    return is_int(value) or isinstance(value, float | np.floating)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool, or a TypeError naming ``name``: a flag takes True or False only
    (a string such as ``"no"`` is truthy and would silently mean True)."""
    import numpy as np

    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_int(name: str, value: Any, least: int, *, optional: bool = False) -> Any:
    """``value`` as an int >= ``least`` (or None, if ``optional``), else a ValueError naming
    ``name`` (a count, a size, a NumPy seed: NumPy's own error names no argument)."""
    if optional and value is None:
        return None
    if not is_int(value) or value < least:
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an int >= {least}, "
                         f"got {value!r}")
    return int(value)


def check_callable(name: str, value: Any, signature: str) -> None:
    """A TypeError naming ``name`` unless ``value`` can be called."""
    if not callable(value):
        raise TypeError(f"{name} must be a function {signature}, got {type(value).__name__}")


def check_like_params(name: str, tree: Any, params: Any) -> None:
    """A ValueError unless ``tree`` has the structure and leaf shapes of ``params`` (a
    direction, an update): broadcasting would otherwise give an answer for a wrong one."""
    check_not_deleted(name, tree)
    if jax.tree.structure(tree) != jax.tree.structure(params):
        raise ValueError(f"{name} must have the structure of params, "
                         f"{jax.tree.structure(params)}, got {jax.tree.structure(tree)}")
    bad = [f"{name}{jax.tree_util.keystr(path)} has shape {jax.numpy.shape(leaf)} but "
           f"expected {jax.numpy.shape(p)}"
           for (path, leaf), p in zip(jax.tree_util.tree_leaves_with_path(tree),
                                      jax.tree.leaves(params))
           if jax.numpy.shape(leaf) != jax.numpy.shape(p)]
    if bad:
        raise ValueError(f"{name} does not fit params: " + "; ".join(bad))


def check_not_deleted(name: str, tree: Any) -> None:
    """A ValueError naming the first array of ``tree`` that was deleted: donated to a train
    step (``make_train_step``/``make_train_loop`` donate the state they are given, and
    ``TrainState.create(params, ...)`` holds the very arrays of ``params``), or deleted by
    hand. JAX's own error names only a shape. Tracers and host arrays pass."""
    def deleted(leaf: Any) -> bool:
        return (isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer)
                and leaf.is_deleted())

    if not any(deleted(leaf) for leaf in jax.tree.leaves(tree)):   # the paths only if needed
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if deleted(leaf):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has been deleted: it was donated to a "
                f"train step, which updates the state it is given in place (a state made by "
                f"TrainState.create(params, ...) holds these very arrays); use the state the "
                f"step returns (state.params), or make the step with donate=False")
