"""verify_layer: a layer record's hand-written rules against autodiff of its own forward.

A record you write (:func:`jaxbp.layers.register`) is a forward and, by hand, its
backward and per-sample rules. At one point ``(params, x)`` and random output errors
``delta`` this checks every rule the record has:

* ``backward``: the input error ``J_x^T delta`` and the parameter gradient
  ``J_p^T delta`` against ``jax.vjp`` of ``forward``, leaf by leaf, and along random
  directions against central differences and the Taylor test (:func:`jaxbp.verify_vjp`
  of the record's rule as a ``custom_vjp``);
* ``per_sample_grads``: against ``jax.vjp`` of each sample's forward alone;
* ``per_sample_sq_norms``: against the squared norms of those;
* where the record has them, ``per_sample_sq_norms_and_sum`` (its norms, and its
  ``weights -> sum_i w_i g_i`` at random weights), ``sq_grad_sum`` (``sum_k sum_i g_ki^2``
  for two sets of errors), ``backward_kept`` (its input error and gradient equal
  ``backward``'s), K-FAC's reading (``kfac_inputs`` and ``pre_activation_error``: the
  input rows times the pre-activation errors are the weight gradient, in the rows the
  preconditioner acts on) and the feedback capabilities (``feedback_shape``, ``feedback_of``,
  ``feedback_params`` or ``feedback_transport``: under the feedback that is backprop
  itself, of the shapes ``feedback_shape`` gives, the backward is ``backward``).

The forward is the definition: a forward that is wrong is not found here. An integer
input (tokens) gets no input error (``need_input=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.check.leaves import check_knobs, compare_leaves, rtol_table
from jaxbp.check.report import GradReport, LeafCheck
from jaxbp.check.verify_fn import verify_vjp
from jaxbp.input_checks import as_array
from jaxbp.layers.base import REQUIRED, feedback_of, feedback_params, is_shape
from jaxbp.network_curvature import kfac_rows
from jaxbp.types import PyTree, check_not_deleted


def verify_layer(layer: Any, x: Any, params: PyTree | None = None, *,
                 rtol: float | None = None, atol: float | None = None, n_fd: int = 3,
                 seed: int = 0) -> GradReport:
    """Check a layer record's backward and per-sample rules against ``jax.vjp`` of its
    forward, and K-FAC's and the feedback rules' reading of it against its backward (see
    the module docstring for each rule and its reference).

    Args:
      layer: a layer record (``output_shape``, ``init``, ``forward``, ``backward``; the
        per-sample rules and the optional capabilities are checked where present).
      x: a batch of inputs ``(batch, *in_shape)``; floating (float64 for the tightest
        check, with ``jax.config.update("jax_enable_x64", True)``) or integer tokens.
      params: the point; default ``layer.init(jax.random.key(seed), in_shape, dtype)``
        in x's dtype (the default float dtype for tokens).
      rtol, atol, n_fd, seed: as :func:`jaxbp.verify_vjp`.

    Returns:
      A :class:`~jaxbp.check.GradReport` titled ``verify_layer``: the backward's rows and
      directions, then one row per leaf of each per-sample rule, ``backward_kept``, K-FAC's
      reading and the feedback rules', and a note naming each rule the record does not
      have.
    """
    _check_layer(layer)
    check_knobs(rtol=rtol, atol=atol, fd_eps=None, fd_rtol=None, n_fd=n_fd, seed=seed)
    check_not_deleted("x", x)
    x = _check_batch(as_array("x", x))
    takes_error = bool(jnp.issubdtype(x.dtype, jnp.floating))
    if params is None:
        dtype = x.dtype if takes_error else jnp.zeros(()).dtype
        params = layer.init(jax.random.key(seed), tuple(x.shape[1:]), dtype)
    check_not_deleted("params", params)
    result = layer.forward(params, x)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"the record's forward must return a tuple (output, cache), got "
                        f"{type(result).__name__}")
    out, cache = result
    _check_output_shape(layer, x, out)
    rng = np.random.default_rng(seed + 1)
    delta = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
    returned = _check_returns(layer, params, x, cache, delta, takes_error)
    by_hand, plain = _backward_as_vjp(layer, x, takes_error)
    backward = verify_vjp(by_hand, params, *((x,) if takes_error else ()), reference=plain,
                          rtol=rtol, atol=atol, n_fd=n_fd, seed=seed)
    rows, notes = _per_sample_rows(layer, params, x, cache, delta, rtol, atol, rng)
    if "backward_kept" in returned:
        rows += _kept_rows(returned, takes_error, rtol, atol)
    else:
        notes.append("backward_kept: not defined by the record, not checked")
    if all(callable(getattr(layer, name, None)) for name in KFAC_READS):
        rows += _kfac_rows(layer, cache, delta, returned["backward"][1], rtol, atol)
    else:
        notes.append("kfac_inputs, pre_activation_error: not both defined by the record, "
                     "K-FAC's reading of it not checked")
    if callable(getattr(layer, "feedback_shape", None)):
        rows += _feedback_rows(layer, params, x, cache, delta, returned["backward"],
                               takes_error, rtol, atol)
    else:
        notes.append("feedback_shape: not defined by the record (the feedback rules refuse "
                     "it), not checked")
    inherent = "JVP/VJP consistency not checked"   # by_hand is a custom_vjp by design
    notes = [note for note in backward.notes if not note.startswith(inherent)] + notes
    return GradReport(_named(backward.leaves) + tuple(rows), backward.directions,
                      {**rtol_table(rows, rtol), **backward.rtol}, tuple(notes),
                      title=f"verify_layer ({type(layer).__name__})",
                      reference_name="jax.vjp of its forward")


def _named(rows: tuple[LeafCheck, ...]) -> tuple[LeafCheck, ...]:
    """verify_vjp's rows named for the record: ``out -> args[0]['w']`` is the backward's
    ``grads['w']``, ``out -> args[1]`` its input error (the ``value`` row, the forward
    against itself, is dropped)."""
    names = (("out -> args[0]", "backward: grads"), ("out -> args[1]", "backward: input error"))
    renamed = []
    for row in rows:
        for old, new in names:
            if row.path.startswith(old):
                renamed.append(dataclasses.replace(row, path=new + row.path[len(old):]))
    return tuple(renamed)


def _check_layer(layer: Any) -> None:
    missing = [name for name in REQUIRED if not callable(getattr(layer, name, None))]
    if missing:
        raise TypeError(f"layer must be a layer record (jaxbp.layers.LayerRecord: "
                        f"{', '.join(REQUIRED)}), got {type(layer).__name__} without "
                        f"{', '.join(missing)}")


def _check_batch(x: jax.Array) -> jax.Array:
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be a batch (batch, *in_shape) with at least one sample, "
                         f"got shape {tuple(x.shape)}")
    return jnp.asarray(x)


def _check_output_shape(layer: Any, x: jax.Array, out: jax.Array) -> None:
    """The record's shape rule says what its forward gives (the chain relies on it)."""
    said = tuple(layer.output_shape(tuple(x.shape[1:])))
    if said != tuple(out.shape[1:]):
        raise ValueError(f"layer.output_shape({tuple(x.shape[1:])}) is {said}, but its "
                         f"forward gives samples of shape {tuple(out.shape[1:])}")


def _check_like(what: str, got: Any, want: Any) -> None:
    """``got`` has the pytree structure and leaf shapes of ``want``, else a ValueError."""
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise ValueError(f"the record's {what} has the structure {jax.tree.structure(got)}, "
                         f"expected {jax.tree.structure(want)}")
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                            jax.tree.leaves(want)):
        if np.shape(g) != np.shape(w):
            raise ValueError(f"the record's {what}{jax.tree_util.keystr(path)} has shape "
                             f"{np.shape(g)}, expected {np.shape(w)}")


def _check_returns(layer: Any, params: PyTree, x: jax.Array, cache: Any, delta: jax.Array,
                   takes_error: bool) -> dict[str, tuple[Any, ...]]:
    """``backward`` (and ``backward_kept``) return what the chain reads: ``(delta_in,
    grads)`` shaped like ``(x, params)`` (named here, not as JAX's custom_vjp error).
    Returns each rule's result at ``delta``, by name."""
    results = {}
    for name, count in (("backward", 2), ("backward_kept", 3)):
        rule = getattr(layer, name, None)
        if not callable(rule):
            continue
        result = rule(params, cache, delta, need_input=takes_error)
        if not (isinstance(result, tuple) and len(result) == count):
            raise TypeError(f"the record's {name} must return a tuple of {count} (delta_in, "
                            f"grads{', kept' if count == 3 else ''}), got "
                            f"{type(result).__name__}")
        _check_like(f"{name}'s grads", result[1], params)
        if takes_error:
            _check_like(f"{name}'s input error", result[0], x)
        results[name] = result
    return results


def _backward_as_vjp(layer: Any, x: jax.Array, takes_error: bool) -> tuple[Any, Any]:
    """``(params[, x]) -> out`` with the record's backward as its VJP, and the plain forward
    (the reference JAX differentiates); tokens are closed over."""
    def plain(params: PyTree, *inputs: jax.Array) -> jax.Array:
        return layer.forward(params, inputs[0] if takes_error else x)[0]

    @jax.custom_vjp
    def by_hand(params: PyTree, *inputs: jax.Array) -> jax.Array:
        return plain(params, *inputs)

    def by_hand_fwd(params: PyTree, *inputs: jax.Array) -> tuple[jax.Array, Any]:
        out, cache = layer.forward(params, inputs[0] if takes_error else x)
        return out, (params, cache)

    def by_hand_bwd(saved: Any, delta_out: jax.Array) -> tuple[Any, ...]:
        delta_in, grads = layer.backward(*saved, delta_out, need_input=takes_error)
        return (grads, delta_in) if takes_error else (grads,)

    by_hand.defvjp(by_hand_fwd, by_hand_bwd)
    return jax.jit(by_hand), jax.jit(plain)   # evaluated many times: compiled once each


def _per_sample_reference(layer: Any, params: PyTree, x: jax.Array,
                          delta: jax.Array) -> PyTree:
    """``g_i = J_p(x_i)^T delta_i`` by ``jax.vjp`` of sample i's forward alone, stacked."""
    def one(x_i: jax.Array, delta_i: jax.Array) -> PyTree:
        _, vjp = jax.vjp(lambda p: layer.forward(p, x_i[None])[0], params)
        return vjp(delta_i[None])[0]

    return jax.vmap(one)(x, delta)


def _sq_norms(per_sample: PyTree, batch: int) -> jax.Array:
    """``||g_i||^2`` over all leaves, in the gradients' own dtype (its tolerance)."""
    leaves = jax.tree.leaves(per_sample)
    return sum((jnp.sum(leaf.reshape(batch, -1) ** 2, axis=1) for leaf in leaves),
               jnp.zeros(batch, jnp.result_type(*leaves)))


def _leaf_rows(label: str, manual: PyTree, reference: PyTree, rtol: float | None,
               atol: float | None) -> list[LeafCheck]:
    _check_like(label, manual, reference)
    paths = [label + jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    manual_leaves = jax.tree.structure(reference).flatten_up_to(manual)
    return compare_leaves(paths, manual_leaves, jax.tree.leaves(reference), rtol, atol)


def _per_sample_rows(layer: Any, params: PyTree, x: jax.Array, cache: Any, delta: jax.Array,
                     rtol: float | None, atol: float | None,
                     rng: np.random.Generator) -> tuple[list[LeafCheck], list[str]]:
    """Each per-sample rule the record has against autodiff's per-sample gradients
    ``g_i`` at ``delta`` (and, for ``sq_grad_sum``, at a second set of errors)."""
    if not jax.tree.leaves(params):
        return [], ["no parameters: no per-sample rule to check"]
    batch, reference = delta.shape[0], _per_sample_reference(layer, params, x, delta)
    norms = _sq_norms(reference, batch)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, batch), delta.dtype)
    other = jnp.asarray(rng.standard_normal(delta.shape), delta.dtype)

    def norms_and_sum(rule: Any) -> list[LeafCheck]:
        got_norms, weighted_sum = rule(params, cache, delta)
        return _leaf_rows("per_sample_sq_norms_and_sum: norms", got_norms, norms, rtol,
                          atol) + _leaf_rows(
            "per_sample_sq_norms_and_sum: sum", weighted_sum(weights),
            jax.tree.map(lambda g: jnp.tensordot(weights, g, 1), reference), rtol, atol)

    def sq_grad_sum(rule: Any) -> list[LeafCheck]:
        want = jax.tree.map(lambda a, b: jnp.sum(a ** 2, 0) + jnp.sum(b ** 2, 0), reference,
                            _per_sample_reference(layer, params, x, other))
        return _leaf_rows("sq_grad_sum", rule(params, cache, jnp.stack([delta, other])), want,
                          rtol, atol)

    checks = {
        "per_sample_grads": lambda rule: _leaf_rows(
            "per_sample_grads", rule(params, cache, delta), reference, rtol, atol),
        "per_sample_sq_norms": lambda rule: _leaf_rows(
            "per_sample_sq_norms", rule(params, cache, delta), norms, rtol, atol),
        "per_sample_sq_norms_and_sum": norms_and_sum,
        "sq_grad_sum": sq_grad_sum,
    }
    rows: list[LeafCheck] = []
    notes = []
    for name, check in checks.items():
        rule = getattr(layer, name, None)
        if callable(rule):
            rows += check(rule)
        else:
            notes.append(f"{name}: not defined by the record, not checked")
    return rows, notes


KFAC_READS = ("kfac_inputs", "pre_activation_error")
"""What K-FAC reads of a record with a weight ``"w"`` (and bias ``"b"``): its input rows
and the errors at its pre-activation (the Kronecker block's A and G)."""


def _kfac_rows(layer: Any, cache: Any, delta: jax.Array, grads: PyTree, rtol: float | None,
               atol: float | None) -> list[LeafCheck]:
    """K-FAC's reading of the record against its gradient: the input rows ``a`` of
    ``kfac_inputs`` and the pre-activation errors ``e`` must give the weight gradient in
    the rows the preconditioner acts on, ``a^T e = kfac_rows(dC/dW)`` (a conv kernel
    channel first, the patches' order), and the bias's ``sum e``: a layout that does not
    match would precondition another gradient's entries."""
    inputs = layer.kfac_inputs(cache)[0]
    errors = layer.pre_activation_error(cache, delta)
    errors = errors.reshape(-1, errors.shape[-1])
    got, want = {"w": inputs.T @ errors}, {"w": kfac_rows(grads["w"])}
    if "b" in grads:
        got["b"], want["b"] = jnp.sum(errors, axis=0), grads["b"]
    return _leaf_rows("kfac: input rows^T errors", got, want, rtol, atol)


def _feedback_rows(layer: Any, params: PyTree, x: jax.Array, cache: Any, delta: jax.Array,
                   plain: tuple[Any, Any], takes_error: bool, rtol: float | None,
                   atol: float | None) -> list[LeafCheck]:
    """The feedback capabilities against the backward: under ``feedback_of`` (the
    feedback that is backprop itself, of the shapes ``feedback_shape`` says, which a random
    feedback is drawn in) the backward run on ``feedback_params`` gives the backward's own
    input error and gradient."""
    in_shape = tuple(x.shape[1:])
    shapes = layer.feedback_shape(in_shape)
    if shapes is None:          # the layer keeps its own J^T: nothing to replace
        return []
    feedback = feedback_of(layer, params, in_shape)
    _check_like("feedback_of", feedback,
                jax.tree.map(jnp.zeros, shapes, is_leaf=is_shape))
    delta_in, grads = layer.backward(feedback_params(layer, params, feedback), cache, delta,
                                     need_input=takes_error)
    rows = _leaf_rows("feedback: grads under feedback_of", grads, plain[1], rtol, atol)
    if takes_error:
        rows += _leaf_rows("feedback: input error under feedback_of", delta_in, plain[0],
                           rtol, atol)
    return rows


def _kept_rows(results: dict[str, tuple[Any, ...]], takes_error: bool, rtol: float | None,
               atol: float | None) -> list[LeafCheck]:
    """``backward_kept``'s input error and gradient against ``backward``'s, both at the
    same errors (its kept errors feed K-FAC, which the backward's own rows do not reach)."""
    delta_in, grads = results["backward"]
    kept_in, kept_grads, _ = results["backward_kept"]
    rows = _leaf_rows("backward_kept: grads", kept_grads, grads, rtol, atol)
    if takes_error:
        rows += _leaf_rows("backward_kept: input error", kept_in, delta_in, rtol, atol)
    return rows
