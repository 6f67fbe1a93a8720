"""Per-example gradients, their norms, clipping and DP-SGD, from the one recursion's deltas.

Let ``l_i`` be sample i's own loss (not divided by the batch size B), so the
batch cost is ``C = (1/B) sum_i l_i`` and its gradient the mean of the
per-example gradients ``g_i = dl_i/dtheta``. For a dense layer the recursion
already holds the per-sample input ``a_i = a^{l-1}_i`` (fan_in) and error
``delta_i = delta^l_i`` (fan_out), and

.. math::
    g_i^{W} = a_i \\otimes \\delta_i, \\qquad g_i^{b} = \\delta_i, \\qquad
    \\|g_i^{W,b}\\|^2 = \\|\\delta_i\\|^2 (\\|a_i\\|^2 + 1)

(the norm of an outer product is the product of the norms). So norms,
clipping and variances need only ``(B, width)`` arrays per layer, never the
``(B, fan_in, fan_out)`` per-example weight gradients; only
:func:`per_example_grads` builds those, because it is asked to.

References:
  Goodfellow, "Efficient per-example gradient computations", 2015.
  Abadi et al., "Deep learning with differential privacy", CCS 2016.
  Bu et al., "Differentially private optimization on large model at small
  cost" (book-keeping), 2022.
  Dangel et al., "BackPACK: packing more into backprop", ICLR 2020.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import input_checks, network, tied_embedding
from jaxbp.layers.base import sq_norms_and_sum
from jaxbp.layers.chain import require_per_sample
from jaxbp.losses import mean_loss
from jaxbp.mlp import Net
from jaxbp.network import Network
from jaxbp.types import Array, ArrayLike, Params, PRNGKey

ClipNorm = float | Sequence[float] | Array
"""One global clip norm C, or one C_l per layer."""


def _parametrised(params: Params) -> list[int]:
    """The layers of a Network that have parameters (the ones a gradient has entries for)."""
    return [l for l, p in enumerate(params) if jax.tree.leaves(p)]


def _network_sq_norms(net: Network, params: Params, caches: tuple[Any, ...],
                      deltas: tuple[Array, ...]) -> Array:
    """(B, G): each sample's squared gradient norm per parametrised layer, from the records
    (a tied table's cross term with the first group: :mod:`jaxbp.tied_embedding`)."""
    require_per_sample(net.layers, params, "layers", "the per-example norm")
    params = tied_embedding.layer_params(net, params)
    sq = jnp.stack([sq_norms_and_sum(net.layers[l], params[l], caches[l], deltas[l])[0]
                    for l in _parametrised(params)], axis=1)
    return tied_embedding.with_cross_term(net, params, caches, deltas, sq)


def clipped_mean(net: Network, params: Params, x: Array, y: Array,
                          clip_norm: Array, mask: Array | None = None,
                          denominator: Array | float | None = None,
                          key: Array | None = None) -> tuple[Array, Params, Array]:
    """The clipped mean for a Network: per-sample errors at every layer's output (one
    reversed loop), norms from the records, then each parametrised layer's gradient rule
    applied once to its errors scaled by ``s_i / B`` (every rule is linear in them).

    With ``mask`` (B,) bool, a padded batch: the errors of rows where it is False are
    zeroed before anything reads them, so those rows reach no sum, norm or clip factor,
    the loss is the mean over the real rows, and the clipped sum is divided by
    ``denominator`` (default B) rather than by the number of real rows. ``key``: a
    training step's (dropout masks: each sample's own rows of them).
    """
    require_per_sample(net.layers, params, "layers", "per-example clipping")
    losses, out, caches, deltas = network.per_sample_deltas(net, params, x, y, key)
    params = tied_embedding.layer_params(net, params)    # a tied head's weight: E^T
    if mask is not None:
        deltas = tuple(jnp.where(mask.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
                       for d in deltas)
    groups = _parametrised(params)
    norms_and_sums = [sq_norms_and_sum(net.layers[l], params[l], caches[l], deltas[l])
                      for l in groups]
    sq = tied_embedding.with_cross_term(net, params, caches, deltas,
                                        jnp.stack([sq for sq, _ in norms_and_sums], axis=1))
    factors = _clip_factors(sq, clip_norm)
    denominator = x.shape[0] if denominator is None else denominator
    grads = [jax.tree.map(jnp.zeros_like, p) for p in params]
    for g, (l, (_, weighted_sum)) in enumerate(zip(groups, norms_and_sums)):
        grads[l] = weighted_sum((factors[:, g] / denominator).astype(deltas[l].dtype))
    grads = tied_embedding.tied_grads(net, tuple(grads))  # each use's clipped sum: linear
    if mask is None:
        return mean_loss(net.loss_fn, out, y), grads, out
    losses = jnp.where(mask, losses, 0)
    return jnp.sum(losses) / jnp.maximum(jnp.sum(mask), 1), grads, out


@functools.partial(jax.jit, static_argnums=0)
def _per_example_grads(net: Net, params: Params, x: Array, y: Array) -> Params:
    chain = network.as_network(net)
    require_per_sample(chain.layers, params, "layers", "the per-example gradient")
    _, caches, deltas = network.layer_deltas(chain, params, x, y, per_sample=True)
    params = tied_embedding.layer_params(chain, params)
    return tied_embedding.tied_grads(chain, tuple(
        layer.per_sample_grads(p, c, d) if jax.tree.leaves(p) else p
        for layer, p, c, d in zip(chain.layers, params, caches, deltas)))


def per_example_grads(net: Net, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """Every sample's own gradient: the grads pytree with a leading batch axis.

    .. math::
        g_i^{W^l} = a^{l-1}_i \\otimes \\delta^l_i, \\qquad g_i^{b^l} = \\delta^l_i

    ``g_i`` is the gradient of sample i's loss alone, not divided by B: the
    batch gradient of :func:`jaxbp.backprop` is ``mean_i g_i``. Memory is
    O(B * P): use :func:`per_example_grad_norms` or :func:`clipped_grad` when
    only norms or the clipped mean are needed.

    Args:
      net, params: the network and its parameters.
      x: (B, n_in); y: as for ``net.cost``.

    Returns:
      A tuple of ``{"w": (B, fan_in, fan_out), "b": (B, fan_out)}``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _per_example_grads(net, params, x, y)


@functools.partial(jax.jit, static_argnums=0)
def _per_example_grad_norms(net: Net, params: Params, x: Array, y: Array) -> Array:
    chain = network.as_network(net)
    _, caches, deltas = network.layer_deltas(chain, params, x, y, per_sample=True)
    return jnp.sqrt(jnp.sum(_network_sq_norms(chain, params, caches, deltas), axis=1))


def per_example_grad_norms(net: Net, params: Params, x: ArrayLike, y: ArrayLike) -> Array:
    """``||g_i||`` for every sample, exactly, without forming any g_i.

    .. math::
        \\|g_i\\|^2 = \\sum_l \\|\\delta^l_i\\|^2 (\\|a^{l-1}_i\\|^2 + 1)

    One forward and one backward pass; memory O(B * sum of widths).

    Returns:
      (B,) the 2-norms over all parameters of each sample's gradient.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _per_example_grad_norms(net, params, x, y)


def _clip_groups(net: Net) -> int:
    """How many per-layer clip norms a net takes: its weight layers (MLP) or its layers
    with parameters (Network)."""
    return len(_parametrised(network.as_network(net).param_shapes()))


def check_clip_norm(net: Net, clip_norm: Any) -> Any:
    """clip_norm checked: one number, or L numbers (one per layer), all > 0.

    Concrete values come back as a float64 NumPy array (shape () or (L,));
    traced ones are returned as they are.
    """
    values = check_clip_values(clip_norm)
    if isinstance(values, jax.core.Tracer):
        return values
    if np.ndim(values) == 1 and getattr(network.as_network(net), "tie_embedding", False):
        raise ValueError("clip_norm must be one number for a network with tie_embedding=True: "
                         "its token table serves two layers, so no per-layer norm bounds it")
    groups = _clip_groups(net)
    if values.ndim > 1 or (values.ndim == 1 and len(values) != groups):
        which = "layer with parameters" if isinstance(net, Network) else "layer"
        raise ValueError(f"clip_norm must be one number or {groups} numbers (one per "
                         f"{which}), got shape {values.shape}: {clip_norm!r}")
    if not np.all(values > 0):
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    return values


def check_clip_values(clip_norm: Any) -> Any:
    """clip_norm's values, whatever the net (its count is :func:`check_clip_norm`'s):
    real numbers, all > 0 (inf: no clipping). Concrete ones as a float64 NumPy array;
    traced ones as they are. A gradient source checks them when it is made."""
    if isinstance(clip_norm, jax.core.Tracer):
        return clip_norm
    try:
        raw = np.asarray(clip_norm)
    except (TypeError, ValueError):
        raw = np.asarray(None)
    if raw.dtype.kind not in "iuf":      # a string "1" or a bool would convert
        raise TypeError(f"clip_norm must be a number or numbers, got "
                        f"{type(clip_norm).__name__}: {clip_norm!r}")
    values = raw.astype(np.float64)
    if not np.all(values > 0):
        raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
    return values


def check_noise_and_clip(net: Net, clip_norm: Any, noise_multiplier: Any) -> tuple[Any, Any]:
    """Both checked, and together: noise scaled by an infinite clip norm is infinite."""
    clip_norm, noise_multiplier = check_clip_norm(net, clip_norm), check_noise(noise_multiplier)
    if isinstance(clip_norm, np.ndarray) and isinstance(noise_multiplier, np.ndarray) \
            and noise_multiplier > 0 and not np.all(np.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be finite when noise_multiplier > 0 (the noise std "
                         f"is noise_multiplier * clip_norm), got clip_norm {clip_norm!r} with "
                         f"noise_multiplier {float(noise_multiplier)}")
    return clip_norm, noise_multiplier


def _clip_factors(sq: Array, clip_norm: Array) -> Array:
    """(B, L): the factor each sample's layer error is scaled by, from (B, L) ``||g_i^l||^2``.

    Global C: ``min(1, C / ||g_i||)`` for every layer; per-layer C_l:
    ``min(1, C_l / ||g_i^l||)``. A zero gradient keeps factor 1.
    """
    clip_norm = jnp.asarray(clip_norm, sq.dtype)
    norms = jnp.sqrt(sq) if clip_norm.ndim == 1 else jnp.sqrt(jnp.sum(sq, axis=1,
                                                                      keepdims=True))
    factors = jnp.where(norms > clip_norm, clip_norm / jnp.where(norms > 0, norms, 1), 1)
    return jnp.broadcast_to(factors, sq.shape)


@functools.partial(jax.jit, static_argnums=0)
def _clipped_grad(net: Net, params: Params, x: Array, y: Array, clip_norm: Array) -> Params:
    return clipped_mean(network.as_network(net), params, x, y, clip_norm)[1]


def clipped_grad(
    net: Net, params: Params, x: ArrayLike, y: ArrayLike, clip_norm: ClipNorm
) -> Params:
    """The mean of per-example gradients, each clipped to ``clip_norm``, in one backward pass.

    .. math::
        \\bar g = \\frac{1}{B} \\sum_i g_i \\min\\left(1, \\frac{C}{\\|g_i\\|}\\right)
        \\quad\\Rightarrow\\quad
        \\bar g^{W^l} = \\frac{1}{B} a^{l-1\\top} (s \\odot \\delta^l), \\;
        s_i = \\min(1, C / \\|g_i\\|)

    The per-sample deltas give every ``||g_i||`` (:func:`per_example_grad_norms`);
    scaling each sample's error row by ``s_i`` and contracting with the
    activations gives the clipped mean directly (the book-keeping of Bu et
    al. 2022): no second backward pass, no per-example gradient formed.

    Args:
      net, params, x, y: as :func:`jaxbp.backprop`.
      clip_norm: C > 0 for the whole gradient of a sample, or a sequence of
        L values C_l, each clipping that sample's (W^l, b^l) gradient.

    Returns:
      Grads shaped like ``params``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _clipped_grad(net, params, x, y, check_clip_norm(net, clip_norm))


def noise_std(clip_norm: Array, noise_multiplier: Array) -> Array:
    """sigma * C, with C = sqrt(sum_l C_l^2) for per-layer norms (the total sensitivity)."""
    clip_norm = jnp.asarray(clip_norm)
    total = jnp.sqrt(jnp.sum(clip_norm**2)) if clip_norm.ndim == 1 else clip_norm
    return noise_multiplier * total


def add_noise(grads: Params, key: PRNGKey, std: Array, batch: int) -> Params:
    """grads + N(0, std^2 I) / B, leaf by leaf, in the grads' dtype."""
    leaves, treedef = jax.tree.flatten(grads)
    keys = jax.random.split(key, len(leaves))
    noisy = [g + (std / batch).astype(g.dtype) * jax.random.normal(k, g.shape, g.dtype)
             for g, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


@functools.partial(jax.jit, static_argnums=0)
def _dp_sgd_grad(net: Net, params: Params, x: Array, y: Array, clip_norm: Array,
                 noise_multiplier: Array, key: PRNGKey) -> Params:
    grads = clipped_mean(network.as_network(net), params, x, y, clip_norm)[1]
    return add_noise(grads, key, noise_std(clip_norm, noise_multiplier), x.shape[0])


def check_noise(noise_multiplier: Any) -> Any:
    if isinstance(noise_multiplier, jax.core.Tracer):
        return noise_multiplier
    try:
        value = np.asarray(noise_multiplier, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"noise_multiplier must be a number, got "
                        f"{type(noise_multiplier).__name__}: {noise_multiplier!r}") from None
    if value.ndim != 0 or not (np.isfinite(value) and value >= 0):
        raise ValueError(f"noise_multiplier must be one finite number >= 0, got "
                         f"{noise_multiplier!r}")
    return value


def dp_sgd_grad(
    net: Net,
    params: Params,
    x: ArrayLike,
    y: ArrayLike,
    clip_norm: ClipNorm,
    noise_multiplier: float,
    key: PRNGKey,
) -> Params:
    """The DP-SGD gradient of Abadi et al. (2016): clipped mean plus Gaussian noise.

    .. math::
        \\tilde g = \\frac{1}{B}\\left(\\sum_i \\text{clip}_C(g_i)
        + \\mathcal{N}(0, \\sigma^2 C^2 I)\\right)

    with ``sigma = noise_multiplier``; for per-layer norms C_l the
    sensitivity is ``C = sqrt(sum_l C_l^2)``. B is the batch actually given
    (the privacy accounting, e.g. with Poisson sampling, is the caller's).

    Args:
      net, params, x, y: as :func:`jaxbp.backprop`.
      clip_norm: as :func:`clipped_grad`.
      noise_multiplier: sigma >= 0.
      key: PRNG key of the noise.

    Returns:
      Grads shaped like ``params``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    input_checks.check_key("key", key)
    return _dp_sgd_grad(net, params, x, y, *check_noise_and_clip(net, clip_norm,
                                                                 noise_multiplier), key)


def clipped_gradient(clip_norm: ClipNorm):
    """Deprecated: :func:`jaxbp.sources.clipped` (the same source; this name goes next release)."""
    return _deprecated("clipped_gradient", "jaxbp.sources.clipped")(clip_norm)


def dp_sgd_gradient(clip_norm: ClipNorm, noise_multiplier: float, key: PRNGKey):
    """Deprecated: :func:`jaxbp.sources.dp_sgd` (the same source; this name goes next release)."""
    return _deprecated("dp_sgd_gradient", "jaxbp.sources.dp_sgd")(clip_norm, noise_multiplier,
                                                                   key)


def _deprecated(old: str, new: str) -> Any:
    """The source ``new`` names, after a DeprecationWarning that ``old`` is its old name."""
    from jaxbp import sources, user_warnings

    user_warnings.warn(f"jaxbp.{old} is deprecated: use {new} (the same gradient source)",
                       DeprecationWarning)
    return getattr(sources, new.rsplit(".", 1)[1])
