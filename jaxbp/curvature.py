"""Second order from the same recursion: Hessian-vector products (R-op) and the GGN diagonal.

**Hessian-vector product** (Pearlmutter 1994). The R-operator
``R{f} = d/dr f(theta + r v) at r = 0`` is applied to every line of the forward
pass and of the recursion, with V = (dW^l, db^l) the direction:

.. math::
    R z^l = R a^{l-1} W^l + a^{l-1} dW^l + db^l, \\qquad
    R a^l = g'(z^l) \\odot R z^l, \\qquad R a^0 = 0

    R\\delta^L = \\tfrac1N \\big[(H_n R a^L) \\odot g'(z^L)
                 + \\partial_a l \\odot g''(z^L) \\odot R z^L\\big]

    R\\delta^l = (R\\delta^{l+1} W^{l+1\\top} + \\delta^{l+1} dW^{l+1\\top}) \\odot g'(z^l)
                 + (\\delta^{l+1} W^{l+1\\top}) \\odot g''(z^l) \\odot R z^l

    (Hv)_{W^l} = R a^{l-1\\top} \\delta^l + a^{l-1\\top} R\\delta^l, \\qquad
    (Hv)_{b^l} = \\textstyle\\sum_n R\\delta^l_n

with ``H_n`` the per-sample Hessian of the loss with respect to a^L and g''
written by hand beside g and g' (:mod:`jaxbp.activations`).

**GGN diagonal** (BackPACK's DiagGGNExact). With ``H_n = S_n S_n^T`` (the
loss's symmetric factor, k columns), each column of S is propagated back as
an output error, all k at once (a batched pass):

.. math::
    \\mathrm{diag}(G)_{W^l} = \\tfrac1N \\sum_{n,c} (a^{l-1}_n)^2 \\otimes (\\delta^l_{n,c})^2

No JAX autodiff is called; ``jax.vmap`` (a batching transform) runs the
recursion over the k columns.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbp import _checks, network_curvature
from jaxbp._typing import Array, ArrayLike, Params
from jaxbp.backprop import layer_deltas, sample_output_delta
from jaxbp.mlp import MLP, forward, matmul
from jaxbp.network import Network, value_grads_and_errors


def _check_direction(params: Params, v: Params) -> None:
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(f"v must have the structure of params, {jax.tree.structure(params)}, "
                         f"got {jax.tree.structure(v)}")
    bad = [f"v{jax.tree_util.keystr(path)} has shape {leaf.shape} but expected {p.shape}"
           for (path, leaf), p in zip(jax.tree_util.tree_flatten_with_path(v)[0],
                                      jax.tree.leaves(params)) if leaf.shape != p.shape]
    if bad:
        raise ValueError("v does not fit params: " + "; ".join(bad))


@functools.partial(jax.jit, static_argnums=0)
def _hvp(net: MLP, params: Params, x: Array, y: Array, v: Params) -> Params:
    acts_g = net.activations
    cache = forward(net, params, x)
    batch = x.shape[0]
    # forward R-pass
    r_acts, r_zs = [jnp.zeros_like(x)], []
    for l, (layer, dlayer) in enumerate(zip(params, v)):
        a_in = cache.acts[l]
        r_z = (matmul(net, r_acts[-1], layer["w"]) + matmul(net, a_in, dlayer["w"])
               + dlayer["b"])
        r_zs.append(r_z)
        r_acts.append(acts_g[l].dg(cache.zs[l], cache.acts[l + 1]) * r_z)
    # output layer: delta^L and R delta^L (per sample, then / N)
    a_out, z_out = cache.acts[-1], cache.zs[-1]
    dl_da = net.loss_fn.sample_grad(a_out, y)
    g1, g2 = acts_g[-1].dg(z_out, a_out), acts_g[-1].d2g(z_out, a_out)
    deltas = layer_deltas(net, params, cache, sample_output_delta(net, cache, y) / batch)
    r_delta = (net.loss_fn.sample_hvp(a_out, y, r_acts[-1]) * g1
               + dl_da * g2 * r_zs[-1]) / batch
    r_deltas = [r_delta]
    for l in range(net.n_layers - 1, 0, -1):  # hidden layers, output side first
        w, dw = params[l]["w"], v[l]["w"]
        back = matmul(net, deltas[l], w, transpose_b=True)  # delta^{l+1} W^{l+1 T}
        r_back = (matmul(net, r_deltas[-1], w, transpose_b=True)
                  + matmul(net, deltas[l], dw, transpose_b=True))
        z, a = cache.zs[l - 1], cache.acts[l]
        r_deltas.append(r_back * acts_g[l - 1].dg(z, a) + back * acts_g[l - 1].d2g(z, a)
                        * r_zs[l - 1])
    r_deltas.reverse()
    return tuple(
        {"w": matmul(net, r_acts[l], deltas[l], transpose_a=True)
              + matmul(net, cache.acts[l], r_deltas[l], transpose_a=True),
         "b": r_deltas[l].sum(axis=0)}
        for l in range(net.n_layers))


def hvp(net: MLP, params: Params, x: ArrayLike, y: ArrayLike, v: Params) -> Params:
    """The Hessian of the cost times a direction, ``H v``, by the R-operator (no autodiff).

    Args:
      net, params, x, y: as :func:`jaxbp.backprop`; C is the batch-mean cost.
      v: a direction shaped like ``params``.

    Returns:
      ``H v`` shaped like ``params``, ``H = d^2 C / dparams^2``.

    An MLP runs the hand-written R-operator; a :class:`jaxbp.Network` (any layer
    type) forward mode (``jax.jvp``) over its hand-written gradient
    (:mod:`jaxbp.network_curvature`).

    Raises:
      ValueError: v does not have the structure and shapes of params (and the
        input errors of :func:`jaxbp.backprop`).
    """
    x, y = _checks.check_inputs(net, params, x, y)
    _check_direction(params, v)
    v = jax.tree.map(lambda t, p: jnp.asarray(t, p.dtype), v, params)
    if isinstance(net, Network):
        return network_curvature.hvp(net, params, x, y, v)
    return _hvp(net, params, x, y, v)


@functools.partial(jax.jit, static_argnums=0)
def _ggn_diag(net: MLP, params: Params, x: Array, y: Array) -> Params:
    cache = forward(net, params, x)
    a_out, z_out = cache.acts[-1], cache.zs[-1]
    factor = net.loss_fn.sample_hessian_factor(a_out, y)  # (B, n_out, k)
    g1 = net.activations[-1].dg(z_out, a_out)
    columns = jnp.moveaxis(factor, -1, 0) * g1  # (k, B, n_out): S_c * g'(z^L)
    deltas = jax.vmap(lambda d: layer_deltas(net, params, cache, d))(columns)
    batch = x.shape[0]
    out = []
    for a_in, delta in zip(cache.acts, deltas):  # delta: (k, B, width)
        sq = jnp.sum(delta * delta, axis=0)  # sum over the k columns: (B, width)
        out.append({"w": matmul(net, a_in * a_in, sq, transpose_a=True) / batch,
                    "b": sq.sum(axis=0) / batch})
    return tuple(out)


def ggn_diag(net: MLP, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """The exact diagonal of the generalised Gauss-Newton ``(1/N) sum_n J_n^T H_n J_n``.

    ``J_n = d a^L_n / dparams``, ``H_n`` the Hessian of the sample loss with
    respect to a^L (squared error: 2I; sigmoid cross-entropy: diag(s(1-s));
    softmax cross-entropy: diag(p) - pp^T). One forward pass and one batched
    backward pass of n_out columns (BackPACK's DiagGGNExact); for a
    :class:`jaxbp.Network` the layers other than Dense square their formed
    per-sample gradients (:mod:`jaxbp.network_curvature`).

    Returns:
      The diagonal, shaped like ``params``.
    """
    x, y = _checks.check_inputs(net, params, x, y)
    if isinstance(net, Network):
        return network_curvature.ggn_diag(net, params, x, y)
    return _ggn_diag(net, params, x, y)


def _sample_targets(net: MLP, a_out: Array, key: Array) -> Array:
    """y drawn from the model's own predictive distribution at a^L (for the MC Fisher):
    the loss record's ``sample_targets``."""
    return net.loss_fn.sample_targets(a_out, key)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _kfac_factors(net: MLP, params: Params, x: Array, y: Array, kind: str,
                  key: Array | None) -> tuple[dict[str, Array], ...]:
    cache = forward(net, params, x)
    if kind == "exact":
        return _kfac_exact(net, params, cache, y)
    targets = y if kind == "empirical" else _sample_targets(net, cache.acts[-1], key)
    return _kfac_from_cache(net, params, cache, targets)[1]  # the unused grads are dropped


def _kfac_exact(net: MLP, params: Params, cache, y: Array) -> tuple[dict[str, Array], ...]:
    """G from every column of the loss Hessian's factor (as :func:`ggn_diag`): KFLR."""
    a_out, z_out = cache.acts[-1], cache.zs[-1]
    factor = net.loss_fn.sample_hessian_factor(a_out, y)            # (B, n_out, k)
    columns = jnp.moveaxis(factor, -1, 0) * net.activations[-1].dg(z_out, a_out)
    deltas = jax.vmap(lambda d: layer_deltas(net, params, cache, d))(columns)
    batch = a_out.shape[0]
    out = []
    for a_in, delta in zip(cache.acts, deltas):                      # delta: (k, B, width)
        a_bar = jnp.concatenate([a_in, jnp.ones((batch, 1), a_in.dtype)], axis=1)
        flat = delta.reshape(-1, delta.shape[-1])                    # the k B rows
        out.append({"A": matmul(net, a_bar, a_bar, transpose_a=True) / batch,
                    "G": matmul(net, flat, flat, transpose_a=True) / batch})
    return tuple(out)


KFAC_KINDS = ("sampled", "exact", "empirical")
"""The kinds of :func:`kfac_factors` (``"mc"`` is kept as another name of ``"sampled"``)."""


def kfac_factors(net: MLP, params: Params, x: ArrayLike, y: ArrayLike,
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
      :mod:`jaxbp.network_curvature` for the convention and the row order), ``{}``
      for a layer without parameters.

    Raises:
      ValueError: an unknown kind, or ``"sampled"`` without a key.
      jaxbp.layers.LayerError: a Network layer with parameters that is neither Dense
        nor Conv2D (LayerNorm, Residual), named.
    """
    if kind not in (*KFAC_KINDS, "mc"):
        raise ValueError(f"Unknown kind {kind!r}. It needs to be one of {list(KFAC_KINDS)}.")
    kind = "sampled" if kind == "mc" else kind
    if kind == "sampled" and key is None:
        raise ValueError("kind='sampled' (the default) draws targets from the model: pass a "
                         "PRNG key (key=jax.random.key(0)), or use kind='exact' (no sampling, "
                         "n_out backward passes) or kind='empirical' (the given labels)")
    x, y = _checks.check_inputs(net, params, x, y)
    if isinstance(net, Network):
        network_curvature.check_kfac_layers(net)
        return network_curvature.kfac_factors(net, params, x, y, kind, key, _sample_targets)
    return _kfac_factors(net, params, x, y, kind, key)


def _kfac_from_cache(net: MLP, params: Params, cache, y: Array) -> tuple[Params, tuple]:
    """Grads and K-FAC factors from one backward pass of the per-sample errors."""
    sample_deltas = layer_deltas(net, params, cache, sample_output_delta(net, cache, y))
    batch = cache.acts[0].shape[0]
    grads, factors = [], []
    for a_in, delta in zip(cache.acts, sample_deltas):
        mean_delta = delta / batch  # the batch-mean cost's delta
        grads.append({"w": matmul(net, a_in, mean_delta, transpose_a=True),
                      "b": mean_delta.sum(axis=0)})
        a_bar = jnp.concatenate([a_in, jnp.ones((batch, 1), a_in.dtype)], axis=1)
        factors.append({"A": matmul(net, a_bar, a_bar, transpose_a=True) / batch,
                        "G": matmul(net, delta, delta, transpose_a=True) / batch})
    return tuple(grads), tuple(factors)


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
    :func:`kfac_factors` (KFC for a conv); ``"empirical"`` reads them off the
    gradient's own pass there too. A LayerNorm or Residual has no
    K-FAC rule: a :class:`jaxbp.layers.LayerError` names it.
    """
    from jaxbp.losses import mean_loss

    if kind not in (*KFAC_KINDS, "mc"):
        raise ValueError(f"Unknown kind {kind!r}. It needs to be one of {list(KFAC_KINDS)}.")
    kind = "sampled" if kind == "mc" else kind
    if kind == "sampled" and key is None:
        raise ValueError("kfac_gradient(kind='sampled') draws targets from the model at "
                         "every step: pass a PRNG key (fold_in(key, step) is used)")

    def gradient(net: MLP | Network, params: Params, x: Array, y: Array, step: Array):
        step_key = None if key is None else jax.random.fold_in(key, step)
        if isinstance(net, Network):
            network_curvature.check_kfac_layers(net)
            value, grads, out, caches, deltas = value_grads_and_errors(net, params, x, y)
            if kind == "empirical":     # the gradient's own errors, times N: no extra pass
                errors = tuple(x.shape[0] * d[None] for d in deltas)
                factors = network_curvature.kfac_from_errors(net, caches, errors)
            else:
                factors = network_curvature.kfac_factors(net, params, x, y, kind, step_key,
                                                         _sample_targets)
            return value, grads, out, {"factors": factors}
        cache = forward(net, params, x)
        grads, factors = _kfac_from_cache(net, params, cache, y)
        if kind == "exact":
            factors = _kfac_exact(net, params, cache, y)
        elif kind == "sampled":
            targets = _sample_targets(net, cache.acts[-1], step_key)
            factors = _kfac_from_cache(net, params, cache, targets)[1]
        value = mean_loss(net.loss_fn, cache.acts[-1], y)
        return value, grads, cache.acts[-1], {"factors": factors}

    return gradient


def kfac_preconditioner(damping: float = 1e-3):
    """An optax transformation: each layer's gradient times the damped inverse K-FAC block.

    .. math::
        [\\Delta W; \\Delta b] = (A + \\pi \\sqrt{\\lambda} I)^{-1}\\,
        [g_W; g_b]\\, (G + \\tfrac{\\sqrt{\\lambda}}{\\pi} I)^{-1}, \\qquad
        \\pi = \\sqrt{\\frac{\\mathrm{tr}(A) / \\dim A}{\\mathrm{tr}(G) / \\dim G}}

    the inverse of ``(A + pi sqrt(l) I) kron (G + sqrt(l)/pi I)``, the factored
    Tikhonov damping of Martens and Grosse (2015). A conv kernel's gradient is taken
    in the factors' row order (``W.transpose(2, 0, 1, 3).reshape(-1, O)``, see
    :mod:`jaxbp.network_curvature`) and put back; layers without parameters pass
    through. Its ``update`` takes the
    factors as an extra argument (``factors=``), which
    :func:`kfac_gradient` provides through the train step; chain it before an
    optax optimizer (``optax.chain(kfac_preconditioner(1e-3), optax.sgd(lr))``).
    """
    import optax

    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping!r}")

    def init(params: Params):
        del params
        return optax.EmptyState()

    def update(updates: Params, state, params: Params | None = None, *, factors=None,
               **extra):
        del params, extra
        if factors is None:
            raise ValueError("kfac_preconditioner needs the K-FAC factors: train with "
                             "grad=jaxbp.kfac_gradient()")
        out = []
        for g, f in zip(updates, factors):
            if not f:                                 # a layer without parameters
                out.append(g)
                continue
            a, gg = f["A"], f["G"]
            pi = jnp.sqrt((jnp.trace(a) / a.shape[0]) / jnp.maximum(
                jnp.trace(gg) / gg.shape[0], 1e-30))
            root = jnp.sqrt(jnp.asarray(damping, a.dtype))
            a_damped = a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype)
            g_damped = gg + root / pi * jnp.eye(gg.shape[0], dtype=gg.dtype)
            rows = network_curvature.kfac_rows(g["w"])
            stacked = jnp.concatenate([rows, g["b"][None]], axis=0)  # [g_W; g_b]
            left = jnp.linalg.solve(a_damped, stacked)
            pre = jnp.linalg.solve(g_damped, left.T).T  # G is symmetric
            out.append({"w": network_curvature.from_kfac_rows(pre[:-1], g["w"].shape),
                        "b": pre[-1]})
        return tuple(out), state

    return optax.GradientTransformationExtraArgs(init, update)
