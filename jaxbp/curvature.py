"""Second order from the same records: Hessian-vector products, the GGN diagonal, K-FAC.

Every quantity runs on the layer records of a :class:`jaxbp.Network` (an MLP on
its Dense chain, :attr:`jaxbp.MLP.network`); the work is in
:mod:`jaxbp.network_curvature`, this module is the checked public face and the
optax preconditioner.

**Hessian-vector product** (Pearlmutter 1994): ``Hv = d/dr grad C(theta + r v)`` at
``r = 0``, forward mode (``jax.jvp``) over the hand-written gradient: the
derivative of our own backward, every layer type, no reverse-mode autodiff.

**GGN diagonal** (BackPACK's DiagGGNExact). With ``H_n = S_n S_n^T`` (the
loss's symmetric factor, k columns), each column of S is propagated back as
an output error, all k at once (a batched pass):

.. math::
    \\mathrm{diag}(G)_{W^l} = \\tfrac1N \\sum_{n,c} (a^{l-1}_n)^2 \\otimes (\\delta^l_{n,c})^2

No reverse-mode autodiff is called; ``jax.vmap`` (a batching transform) runs the
recursion over the k columns.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import input_checks, network, network_curvature
from jaxbp.mlp import Net
from jaxbp.network import as_network, value_grads_and_errors
from jaxbp.sources import SourceResult
from jaxbp.types import Array, ArrayLike, Params, check_like_params, is_real


def hvp(net: Net, params: Params, x: ArrayLike, y: ArrayLike, v: Params) -> Params:
    """``H v``, the Hessian of the cost times a direction: forward mode over our gradient.

    Args:
      net, params, x, y: as :func:`jaxbp.backprop`; C is the batch-mean cost.
      v: a direction shaped like ``params``.

    Returns:
      ``H v`` shaped like ``params``, ``H = d^2 C / dparams^2``.

    Forward mode (``jax.jvp``) over the hand-written gradient, for every layer
    type (an MLP through its Dense chain).

    Raises:
      ValueError: v does not have the structure and shapes of params (and the
        input errors of :func:`jaxbp.backprop`).
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    check_like_params("v", v, params)
    v = jax.tree.map(lambda t, p: jnp.asarray(t, p.dtype), v, params)
    return network_curvature.hvp(as_network(net), params, x, y, v)


def ggn_diag(net: Net, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """The exact diagonal of the generalised Gauss-Newton ``(1/N) sum_n J_n^T H_n J_n``.

    ``J_n = d a^L_n / dparams``, ``H_n`` the Hessian of the sample loss with
    respect to a^L (squared error: 2I; sigmoid cross-entropy: diag(s(1-s));
    softmax cross-entropy: diag(p) - pp^T). One forward pass and one batched
    backward pass of n_out columns (BackPACK's DiagGGNExact); for a
    :class:`jaxbp.Network` the layers other than Dense square their formed
    per-sample gradients (:mod:`jaxbp.network_curvature`). For a sequence output (a
    GPT) the mean is over the M counted tokens, ``(1/M) sum_{n,t} J_{n,t}^T H_{n,t}
    J_{n,t}``: T x n_out columns, each token's at its own position.

    Returns:
      The diagonal, shaped like ``params``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return network_curvature.ggn_diag(as_network(net), params, x, y)


KFAC_KINDS = ("sampled", "exact", "empirical")
"""The kinds of :func:`kfac_factors` (``"mc"`` is kept as another name of ``"sampled"``)."""


def _kfac_kind(kind: Any, key: Any, without_key: str) -> str:
    """``kind`` checked (``"mc"`` read as ``"sampled"``), and a key given where, and only
    where, targets are drawn; ``without_key`` is the error when the key is missing."""
    if kind not in (*KFAC_KINDS, "mc"):
        raise ValueError(f"Unknown kind {kind!r}. It needs to be one of {list(KFAC_KINDS)}.")
    kind = "sampled" if kind == "mc" else kind
    if kind == "sampled" and key is None:
        raise ValueError(without_key)
    if kind != "sampled" and key is not None:   # would be read by nothing
        raise ValueError(f"key is used only by kind='sampled' (targets drawn from the model);"
                         f" kind={kind!r} draws nothing: leave key out")
    if key is not None:
        input_checks.check_key("key", key)
    return kind


def kfac_factors(net: Net, params: Params, x: ArrayLike, y: ArrayLike,
                 kind: str = "sampled", key: Array | None = None) -> tuple[dict[str, Array], ...]:
    """The Kronecker factors of each layer's Fisher block (K-FAC, Martens and Grosse 2015).

    With ``a_bar = [a^{l-1}, 1]`` (the bias as a column of ones) and the
    per-sample error ``delta^l_n`` of sample n's own loss at a target ``t_n``:

    .. math::
        A_l = \\tfrac1N \\sum_n \\bar a_n \\bar a_n^\\top, \\qquad
        G_l = \\tfrac1N \\sum_n \\mathbb{E}_{t_n}\\big[\\delta_n \\delta_n^\\top\\big],
        \\qquad F_l \\approx A_l \\otimes G_l

    where ``F_l`` is the Fisher of the layer's parameters ``[W^l; b^l]``
    ((fan_in + 1, fan_out), flattened row by row). The kinds differ in the targets:

    * ``"sampled"`` (default; ``"mc"`` is the same): ``t_n`` drawn once from the
      model's own predictive distribution (needs ``key``): an unbiased estimate
      of the true Fisher of Martens and Grosse (2015).
    * ``"exact"``: the expectation over ``t_n`` taken exactly, by running the
      recursion on every column of the loss Hessian's factor (for these losses
      the Fisher equals the generalised Gauss-Newton): BackPACK's KFLR
      (Botev et al. 2017). Costs n_out backward passes.
    * ``"empirical"``: ``t_n = y_n``, the given labels: the empirical Fisher,
      the mean of ``g_n g_n^T`` (for one sample ``A \\otimes G = g g^T``
      exactly). Cheap and common, but it is not the Fisher, and as a curvature
      estimate it can mislead (Kunstner, Balles & Hennig 2019).

    Returns:
      A tuple of ``{"A": (fan_in + 1, fan_in + 1), "G": (fan_out, fan_out)}``. For a
      :class:`jaxbp.Network`, one entry per layer: Dense as above, Conv2D the KFC
      factors (patches for A, position-averaged errors for G; see
      :mod:`jaxbp.network_curvature` for the convention and the row order), the
      blocks of :mod:`jaxbp.layers.kfac` for LayerNorm and RMSNorm (``{"diag"}``),
      Embedding (``{"A_diag", "G"}`` per table), SelfAttention (a block per
      projection) and a Residual (a tuple of its inner layers'), ``{}`` for a layer
      without parameters. A sequence output (a GPT) takes the "expand" convention:
      positions are samples of their own (:mod:`jaxbp.layers.kfac`).

    Raises:
      ValueError: an unknown kind, or ``"sampled"`` without a key.
      jaxbp.layers.LayerError: a Network layer with parameters and no K-FAC rule (a
        record without ``kfac_inputs`` or ``kfac_factors``), named.
    """
    kind = _kfac_kind(kind, key, "kind='sampled' (the default) draws targets from the model: "
                      "pass a PRNG key (key=jax.random.key(0)), or use kind='exact' (no "
                      "sampling, n_out backward passes) or kind='empirical' (the given labels)")
    x, y = input_checks.check_inputs(net, params, x, y)
    return network_curvature.kfac_factors(as_network(net), params, x, y, kind, key)


def kfac_gradient(kind: str = "empirical", key: Array | None = None):
    """A train-step gradient source that also hands the optimizer the K-FAC factors.

    Use with an optimizer containing :func:`kfac_preconditioner`::

        optimizer = optax.chain(jaxbp.kfac_preconditioner(1e-3), optax.sgd(0.1, 0.9))
        step = jaxbp.make_train_step(net, optimizer, grad=jaxbp.kfac_gradient())

    The gradient is always that of the given labels. ``kind`` chooses the factors
    (see :func:`kfac_factors`): ``"empirical"`` (default here: the factors come
    from the same forward and backward pass as the gradient, no extra work; the
    empirical Fisher, with its caveat), ``"sampled"`` (targets drawn from the model
    with ``fold_in(key, step)``: one more backward pass per step, the true Fisher
    in expectation) or ``"exact"`` (n_out more backward passes, batched).

    A :class:`jaxbp.Network` of Dense and Conv2D layers (and layers without
    parameters) works too: the gradient is the hand-written one, the factors those of
    :func:`kfac_factors` (KFC for a conv; the transformer records' blocks, a GPT
    trains); ``"empirical"`` reads them off the gradient's own pass there too. A layer
    without a K-FAC rule is named in a :class:`jaxbp.layers.LayerError`.
    """
    kind = _kfac_kind(kind, key, "kfac_gradient(kind='sampled') draws targets from the model "
                      "at every step: pass a PRNG key (fold_in(key, step) is used)")

    def gradient(net: Net, params: Params, x: Array, y: Array, step: Array):
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        net = as_network(net)
        # the step's dropout masks in the gradient (and so in the empirical factors); the
        # sampled and exact factors take their own pass, the evaluation forward
        value, grads, out, caches, kept = value_grads_and_errors(
            net, params, x, y, network.step_key(net, step))
        if kind == "empirical":     # the gradient's own errors, times M: no extra pass
            scale = network_curvature.kfac_scale(net, out, y)
            errors = jax.tree.map(lambda e: scale.count * e[None], kept)
            factors = network_curvature.kfac_from_errors(net, params, caches, errors, scale)
        else:
            step_key = jax.random.fold_in(key, step) if kind == "sampled" else None
            factors = network_curvature.kfac_factors(net, params, x, y, kind, step_key)
        return SourceResult(value, grads, out, {"factors": factors})

    gradient.__qualname__ = "sources.kfac"
    return gradient


def kfac_preconditioner(damping: float = 1e-3):
    """An optax transformation: each layer's gradient times the damped inverse K-FAC block.

    .. math::
        [\\Delta W; \\Delta b] = (A + \\pi \\sqrt{\\lambda} I)^{-1}\\,
        [g_W; g_b]\\, (G + \\tfrac{\\sqrt{\\lambda}}{\\pi} I)^{-1}, \\qquad
        \\pi = \\sqrt{\\frac{\\mathrm{tr}(A) / \\dim A}{\\mathrm{tr}(G) / \\dim G}}

    the inverse of ``(A + pi sqrt(l) I) kron (G + sqrt(l)/pi I)``, the factored
    Tikhonov damping of Martens and Grosse (2015); a table block ``{"A_diag", "G"}``
    the same with A diagonal, a diagonal block ``{"diag"}`` is ``g / (diag + l)``. A
    conv kernel's gradient is taken
    in the factors' row order (``W.transpose(2, 0, 1, 3).reshape(-1, O)``, see
    :mod:`jaxbp.network_curvature`) and put back; layers without parameters pass
    through. Its ``update`` takes the
    factors as an extra argument (``factors=``), which
    :func:`kfac_gradient` provides through the train step; chain it before an
    optax optimizer (``optax.chain(kfac_preconditioner(1e-3), optax.sgd(lr))``).
    """
    import optax

    if not is_real(damping) or not damping > 0 or not np.isfinite(damping):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")

    def init(params: Params):
        del params
        return optax.EmptyState()

    def update(updates: Params, state, params: Params | None = None, *, factors=None,
               **extra):
        del params, extra
        if factors is None:
            raise ValueError("kfac_preconditioner needs the K-FAC factors: train with "
                             "grad=jaxbp.kfac_gradient()")
        return _precondition(updates, factors, damping), state

    return optax.GradientTransformationExtraArgs(init, update)


def _damped_pair(a: Array, g: Array, damping: float) -> tuple[Array, Array]:
    """``(pi sqrt(l), sqrt(l) / pi)``: the factored Tikhonov damping of each factor, with
    ``pi^2 = (tr A / dim A) / (tr G / dim G)`` (A given whole or by its diagonal)."""
    a_mean = jnp.mean(a) if a.ndim == 1 else jnp.trace(a) / a.shape[0]
    pi = jnp.sqrt(a_mean / jnp.maximum(jnp.trace(g) / g.shape[0], 1e-30))
    root = jnp.sqrt(jnp.asarray(damping, g.dtype))
    return pi * root, root / pi


def _kronecker_solve(block: dict[str, Array], rows: Array, damping: float) -> Array:
    """``(A + pi sqrt(l) I)^{-1} rows (G + sqrt(l)/pi I)^{-1}`` (A whole or diagonal)."""
    g = block["G"]
    a = block["A"] if "A" in block else block["A_diag"]
    a_damp, g_damp = _damped_pair(a, g, damping)
    if a.ndim == 1:
        left = rows / (a + a_damp)[:, None]
    else:
        left = jnp.linalg.solve(a + a_damp * jnp.eye(a.shape[0], dtype=a.dtype), rows)
    return jnp.linalg.solve(g + g_damp * jnp.eye(g.shape[0], dtype=g.dtype), left.T).T


def _precondition(grads: Any, factors: Any, damping: float) -> Any:
    """Each block of :mod:`jaxbp.layers.kfac` applied to its part of the gradient: a
    tuple (a chain, a Residual) block by block, ``{"A", "G"}`` on ``{"w", "b"}`` (a conv
    kernel in the factors' row order), ``{"A_diag", "G"}`` on a table, ``{"diag"}``
    elementwise, and a dict of named blocks on ``grads[name]`` or on the pair
    ``{"w": grads["w" + name], "b": grads["b" + name]}`` (attention's projections; the
    weight alone where the layer has no bias)."""
    if isinstance(factors, tuple):
        return tuple(_precondition(g, f, damping) for g, f in zip(grads, factors))
    if not factors:                                       # a layer without parameters
        return grads
    if "A" in factors:
        rows = network_curvature.kfac_rows(grads["w"])
        if "b" not in grads:                                  # a weight without a bias
            pre = _kronecker_solve(factors, rows, damping)
            return {"w": network_curvature.from_kfac_rows(pre, grads["w"].shape)}
        pre = _kronecker_solve(factors, jnp.concatenate([rows, grads["b"][None]], axis=0),
                               damping)
        return {"w": network_curvature.from_kfac_rows(pre[:-1], grads["w"].shape),
                "b": pre[-1]}
    if "A_diag" in factors:
        return _kronecker_solve(factors, grads, damping)
    if "diag" in factors:
        return jax.tree.map(lambda g, d: g / (d + damping), grads, factors["diag"])
    out = dict(grads)
    for name, block in factors.items():
        if name in grads:
            out[name] = _precondition(grads[name], block, damping)
        else:
            pair = {key: grads[key + name] for key in ("w", "b") if key + name in grads}
            for key, value in _precondition(pair, block, damping).items():
                out[key + name] = value
    return out
