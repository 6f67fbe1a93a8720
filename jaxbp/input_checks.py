"""Input checks run once at each public entry, before anything is traced.

Every check collects all the mismatches it finds and raises one error whose
message names the argument, what was expected and what came (chex style).
Shapes and dtypes are static in JAX, so the checks also run on tracers, at
trace time, before XLA sees the program.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import value_checks
from jaxbp.types import Array, Params, check_not_deleted

if TYPE_CHECKING:
    from jaxbp.mlp import Net


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in np.shape(value))


def as_array(name: str, value: Any) -> Any:
    """``value`` itself if it is an array (JAX, NumPy, tracer), else as a NumPy array.

    Raises:
      TypeError: ``value`` is not array-like (a string, a dict, ragged lists).
    """
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    try:
        try:
            array = np.asarray(value)
        except jax.errors.TracerArrayConversionError:
            # a list given to a jitted function arrives as a list of tracers: stacked here
            return jnp.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(value).__name__}: {err}") from None
    if array.dtype == object or array.dtype.kind in "USV":
        raise TypeError(f"{name} must be a numeric array, got {type(value).__name__} "
                        f"of dtype {array.dtype}")
    return array


def check_key(name: str, key: Any) -> None:
    """A PRNG key: ``jax.random.key(...)`` (a typed key) or ``jax.random.PRNGKey(...)``
    (uint32 (2,), a NumPy copy of one too); a traced one too.

    Raises:
      TypeError: naming ``name``, what was expected and what came.
      ValueError: an array of several typed keys (one is expected).
    """
    if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape:
            raise ValueError(f"{name} must be one PRNG key, got an array of {key.size} keys "
                             f"(shape {tuple(key.shape)}); jax.vmap over the call takes one "
                             f"key each, e.g. jax.vmap(net.init)(keys)")
        return
    if isinstance(key, jax.Array | np.ndarray) and key.dtype == np.uint32 and key.shape == (2,):
        return
    what = (f"an array of {key.dtype} and shape {tuple(key.shape)}"
            if hasattr(key, "dtype") and hasattr(key, "shape") else f"{type(key).__name__} "
            f"{key!r}"[:80])
    raise TypeError(f"{name} must be a PRNG key such as jax.random.key(0), got {what}")


def _is_float(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def check_x(net: Net, x: Any, name: str = "x") -> Any:
    """Check x: (batch, n_in), floating, batch >= 1 (errors call it ``name``). Returns x
    as an array.

    Raises:
      TypeError: x is not an array or not floating.
      ValueError: x's rank, width or batch is wrong.
    """
    x = as_array(name, x)
    if not hasattr(net, "sizes"):
        return _check_network_x(net, x, name)
    n_in = net.sizes[0]
    shape = _shape(x)
    if not _is_float(x.dtype):
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                        f"float64), got {x.dtype}; cast it, e.g. x.astype({net.dtype!r})")
    if len(shape) != 2 or shape[1] != n_in:
        raise ValueError(f"{name} has shape {shape} but expected (batch, {n_in}): "
                         f"rank 2 with n_in = sizes[0] = {n_in}")
    if shape[0] < 1:
        raise ValueError(f"{name} has shape {shape}: the batch is empty, expected at least "
                         f"1 row")
    return x


def check_y(net: Net, y: Any, batch: int, name: str = "y") -> Any:
    """Check y against the loss and the batch of x (errors call it ``name``). Returns y as
    an array.

    * ``squared_error`` and ``sigmoid_cross_entropy``: y of shape
      ``(batch, n_out)``, floating or integer.
    * ``softmax_cross_entropy``: y of shape ``(batch, n_out)`` (one-hot or
      probabilities) or integer labels of shape ``(batch,)``; labels held on
      the host (NumPy, lists) are also checked to lie in ``[0, n_out)``.

    Raises:
      TypeError: y is not numeric, or (batch,) labels that are not integers.
      ValueError: y's shape does not fit, or a label is out of range.
    """
    from jaxbp.losses import get_loss

    y = as_array(name, y)
    if getattr(net, "is_sequence", False):
        return _check_sequence_y(net, y, batch, name)
    n_out = net.n_out
    shape = _shape(y)
    loss = get_loss(net.loss)
    if not (_is_float(y.dtype) or jnp.issubdtype(y.dtype, jnp.integer)
            or y.dtype == jnp.bool_):
        raise TypeError(f"{name} must be numeric, got dtype {y.dtype}")
    if loss.integer_labels and len(shape) == 1:
        if shape[0] != batch:
            raise ValueError(f"{name} has shape {shape} but expected ({batch},) integer labels "
                             f"or ({batch}, {n_out}) targets: the batch of x is {batch}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(f"{name} of shape {shape} is read as class labels and must have "
                            f"an integer dtype, got {y.dtype}; pass one-hot targets of shape "
                            f"({batch}, {n_out}) for soft labels")
        value_checks.check_target_values(net, y, name)
        return y
    if shape != (batch, n_out):
        allowed = f"({batch}, {n_out})"
        if loss.integer_labels:
            allowed += f" or ({batch},) integer labels"
        column = ""
        if shape == (batch,) and n_out == 1:
            column = f"; one target per sample as a column: {name}[:, None]"
        elif shape == (batch,) and jnp.issubdtype(y.dtype, jnp.integer):
            column = (f"; class labels take softmax_cross_entropy, or one-hot them: "
                      f"np.eye({n_out})[{name}]")
        raise ValueError(f"{name} has shape {shape} but expected {allowed} for loss "
                         f"{net.loss!r}: batch of x = {batch}, {value_checks.n_out_words(net)}"
                         f"{column}")
    value_checks.check_target_values(net, y, name)
    return y


def _check_sequence_y(net: Any, y: Any, batch: int, name: str) -> Any:
    """Targets of a sequence output (T, n_out): (batch, T) integer labels in [-1, n_out)
    (-1: an ignored token) for softmax cross-entropy, else (batch, T, n_out)."""
    from jaxbp.losses import get_loss

    steps, n_out = net.shapes[-1]
    shape = _shape(y)
    loss = get_loss(net.loss)
    if loss.integer_labels and len(shape) == 2:
        if shape != (batch, steps):
            raise ValueError(f"{name} has shape {shape} but expected ({batch}, {steps}) token "
                             f"labels or ({batch}, {steps}, {n_out}) targets: batch of x = "
                             f"{batch}, T = {steps}")
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise TypeError(f"{name} of shape {shape} is read as token labels and must have "
                            f"an integer dtype, got {y.dtype}")
        value_checks.check_target_values(net, y, name)
        return y
    if shape != (batch, steps, n_out):
        allowed = f"({batch}, {steps}, {n_out})"
        if loss.integer_labels:
            allowed += f" or ({batch}, {steps}) integer labels"
        raise ValueError(f"{name} has shape {shape} but expected {allowed} for loss "
                         f"{net.loss!r} on a sequence output: batch of x = {batch}, T = {steps}, "
                         f"n_out = {n_out}")
    value_checks.check_target_values(net, y, name)
    return y


def _check_network_x(net: Any, x: Any, name: str) -> Any:
    """x of a :class:`jaxbp.Network`: (batch, *input_shape), floating (integer tokens for a
    network with an ``input_dtype``), batch >= 1."""
    shape, expected = _shape(x), tuple(net.input_shape)
    if net.input_dtype is not None:
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"{name} must hold integer tokens (the network's input_dtype "
                            f"is {net.input_dtype}), got {x.dtype}")
    elif not _is_float(x.dtype):
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/"
                        f"float64), got {x.dtype}; cast it, e.g. x.astype({net.dtype!r})")
    if len(shape) != len(expected) + 1 or shape[1:] != expected:
        wanted = ", ".join(map(str, expected))
        raise ValueError(f"{name} has shape {shape} but expected (batch, {wanted}): a batch "
                         f"of samples of input_shape {expected}{_sequence_hint(net, shape)}")
    if shape[0] < 1:
        raise ValueError(f"{name} has shape {shape}: the batch is empty, expected at least "
                         f"1 row")
    value_checks.check_token_values(net, x, name)
    return x


def _sequence_hint(net: Any, shape: tuple[int, ...]) -> str:
    """For a network on tokens given sequences of another length T: the network for them
    (the params do not depend on T; a positions table serves any T up to its rows)."""
    if net.input_dtype is None or len(shape) != 2 or shape[1] < 1:
        return ""
    steps, positions = shape[1], net.layers[0].positions
    if positions is not None and steps > positions:
        return f"; its Embedding has {positions} positions, fewer than {steps}"
    return (f"; the same params serve sequences of {steps} tokens in "
            f"dataclasses.replace(net, input_shape=({steps},))")


@functools.lru_cache(maxsize=64)
def _expected_params(net: Any) -> tuple[Any, list[tuple[str, tuple[int, ...]]]]:
    shapes = net.param_shapes()
    leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return (jax.tree.structure(shapes),
            [(jax.tree_util.keystr(path), tuple(leaf.shape)) for path, leaf in leaves])


def _structure_difference(structure: Any, expected: list[tuple[str, Any]], params: Any,
                          shown: int = 3) -> str:
    """Where ``params`` part from ``net.init``'s (its ``structure`` and ``(path, shape)``
    leaves): the leaves it lacks and the leaves it has beyond them (a few of each, by
    path), else (the same paths in other containers: a list for a tuple) both
    structures."""
    paths = [path for path, _ in expected]
    given = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    given_set, paths_set = set(given), set(paths)
    missing = [p for p in paths if p not in given_set]
    extra = [p for p in given if p not in paths_set]

    def listed(names: list[str]) -> str:
        more = f", ... ({len(names)} in all)" if len(names) > shown else ""
        return ", ".join(f"params{p}" for p in names[:shown]) + more

    parts = ([f"it lacks {listed(missing)}"] if missing else []) \
        + ([f"it has {listed(extra)}, which net.init does not give"] if extra else [])
    if parts:     # e.g. the params of a net with biases given to one built with bias=False
        return "; ".join(parts)
    return f"expected {structure}, got {jax.tree.structure(params)}"


def _check_network_params(net: Any, params: Any) -> None:
    """params of a :class:`jaxbp.Network`: the structure and shapes ``net.init`` gives."""
    structure, expected = _expected_params(net)
    if not expected:
        names = ", ".join(type(layer).__name__ for layer in net.layers)
        raise ValueError(f"the network's layers ({names}) have no parameters: there is "
                         f"nothing to train; add a layer with parameters (Dense, Conv2D, a "
                         f"norm, ...)")
    if jax.tree.structure(params) != structure:
        raise TypeError(f"params must have the structure net.init gives: "
                        f"{_structure_difference(structure, expected, params)}")
    problems, dtypes = [], set()
    for (path, shape), leaf in zip(expected, jax.tree.leaves(params)):
        leaf = as_array(f"params{path}", leaf)
        dtypes.add(leaf.dtype)
        if tuple(leaf.shape) != shape:       # an array's own shape: the hot path of a call
            problems.append(f"params{path} has shape {_shape(leaf)} but expected {shape}")
    if problems:
        raise ValueError("params do not fit the network: " + "; ".join(problems))
    dtypes = {jnp.dtype(d) for d in dtypes}
    if len(dtypes) > 1 or not all(_is_float(d) for d in dtypes):
        raise TypeError(f"params must all share one floating dtype, got "
                        f"{sorted(d.name for d in dtypes)}")


def check_params(net: Net, params: Any) -> None:
    """Check params: a sequence of ``{"w": (fan_in, fan_out), "b": (fan_out,)}``, one dtype.

    Raises:
      TypeError: wrong container, keys or dtypes.
      ValueError: wrong number of layers or a leaf of the wrong shape (every
        mismatch is listed), or a leaf donated to a train step (deleted).
    """
    check_not_deleted("params", params)
    if not hasattr(net, "sizes"):
        return _check_network_params(net, params)
    n_layers = len(net.sizes) - 1
    if not isinstance(params, Sequence) or isinstance(params, str):
        raise TypeError(f"params must be a tuple of {n_layers} dicts with keys 'w' and 'b' "
                        f"(as net.init returns), got {type(params).__name__}")
    if len(params) != n_layers:
        raise ValueError(f"params has {len(params)} layers but expected {n_layers} for "
                         f"sizes {net.sizes}")
    problems: list[str] = []
    dtypes = set()
    for l, layer in enumerate(params):
        if not isinstance(layer, Mapping) or set(layer) != {"w", "b"}:
            got = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
            raise TypeError(f"params[{l}] must be a dict with keys ['b', 'w'], got {got}")
        fan_in, fan_out = net.sizes[l], net.sizes[l + 1]
        for key, expected in (("w", (fan_in, fan_out)), ("b", (fan_out,))):
            leaf = as_array(f"params[{l}][{key!r}]", layer[key])
            dtypes.add(jnp.dtype(leaf.dtype))
            if _shape(leaf) != expected:
                problems.append(f"params[{l}][{key!r}] has shape {_shape(leaf)} but "
                                f"expected {expected}")
    if problems:
        raise ValueError(f"params do not fit sizes {net.sizes}: " + "; ".join(problems))
    if len(dtypes) != 1 or not _is_float(next(iter(dtypes))):
        raise TypeError(f"params must all share one floating dtype, got "
                        f"{sorted(d.name for d in dtypes)}")


def params_dtype(params: Params) -> Any:
    """The one dtype of checked params (their first leaf's)."""
    return jnp.dtype(jax.tree.leaves(params)[0].dtype)


def check_inputs(net: Net, params: Any, x: Any, y: Any = None) -> tuple[Array, Any]:
    """Check params, x (and y when given); return x (and y) ready for the math.

    x and targets y are cast to the dtype of the params, the dtype every
    computation runs in; integer labels stay integers.
    """
    check_params(net, params)
    dtype = params_dtype(params)
    x = check_x(net, x)
    if y is not None:
        y = check_y(net, y, _shape(x)[0])
        labels = jnp.issubdtype(y.dtype, jnp.integer) and np.ndim(y) == value_checks.label_rank(net)
        y = jnp.asarray(y) if labels else jnp.asarray(y, dtype=dtype)
    tokens = getattr(net, "input_dtype", None)
    return jnp.asarray(x, dtype=tokens or dtype), y
