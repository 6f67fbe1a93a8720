"""The verification suite: random MLPs and networks x activations x losses x dtypes.

Every hidden activation meets every loss in every dtype asked for; each case
draws its own depth, widths, batch, output activation and data from a seeded
NumPy generator, so a run is reproducible from ``seed``. After the MLPs of a
dtype come random :class:`jaxbp.Network` s (:func:`random_network`: convs
with stride 1 and 2, SAME and VALID, kernels 1-5, pools, LayerNorm, residual
blocks), one per loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import input_checks, layers, network
from jaxbp.activations import ACTIVATIONS
from jaxbp.backprop import value_and_backprop
from jaxbp.backprop import value_grads_and_output as backprop_values
from jaxbp.check.recipe import to_float64
from jaxbp.check.verify import GradReport, verify_grads
from jaxbp.losses import LOSSES, mean_loss
from jaxbp.mlp import MLP, Net
from jaxbp.network import Network
from jaxbp.types import Array, ArrayLike, Params, check_bool, check_int

DTYPES = ("float64", "float32", "bfloat16")


def random_transformer(i: int, dtype: str) -> tuple[Network, int]:
    """Transformer case i (and its batch): a GPT (:func:`jaxbp.models.gpt`) of depth 1-3,
    1-4 heads of width 1-4, T 1-16 (1 every fourth case), causal or not, LayerNorm or
    RMSNorm, vocab 2-50, mlp_ratio 1-4; every eighth case (i = 7 mod 8) attention's
    blockwise form, 1-8 keys a block; rotary positions where i = 1, 2 mod 4 (head
    width 2 or 4), learned ones otherwise; the SwiGLU feed-forward where i = 2, 3 mod 4;
    residual dropout 0.1 where i = 4 mod 5 (the identity unless a step's key is given);
    one key/value head for all query heads (multi-query) where i = 5, 6 mod 8; no biases
    where i = 2 mod 4 (with rotary positions and SwiGLU: LLaMA-style); the head tied to the
    token table where i = 0 mod 3 (GPT-2's tied embedding). Targets may hold -1 (ignored
    tokens)."""
    from jaxbp import models

    rng = np.random.default_rng(3000 + i)
    heads = int(rng.integers(1, 5))
    rope = i % 4 in (1, 2)
    width = int(rng.integers(1, 5))
    shape = dict(vocab=int(rng.integers(2, 51)),
                 dim=heads * (2 * ((width + 1) // 2) if rope else width),
                 depth=int(rng.integers(1, 4)), heads=heads,
                 seq_len=1 if i % 4 == 0 else int(rng.integers(2, 17)),
                 mlp_ratio=int(rng.integers(1, 5)))
    batch = int(rng.integers(1, 5))
    block = int(rng.integers(1, 9)) if i % 8 == 7 else None
    return models.gpt(**shape, norm=("layer", "rms")[i % 2], dtype=dtype, causal=i % 3 != 2,
                      attention_block=block, positions=("learned", "rope")[rope],
                      mlp=("gelu", "swiglu")[i % 4 in (2, 3)],
                      kv_heads=1 if i % 8 in (5, 6) else None, bias=i % 4 != 2,
                      tie_embedding=i % 3 == 0, dropout=0.1 if i % 5 == 4 else 0.0), batch


def random_tokens(rng: np.random.Generator, net: Network, batch: int,
                  ignored: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Tokens x (batch, T) and next-token targets y (batch, T) for a GPT-shaped net, about
    ``ignored`` of the targets -1 (padding: counted nowhere), at least one counted."""
    steps, vocab = net.shapes[-1]
    x = rng.integers(0, vocab, (batch, steps)).astype(np.int32)
    y = rng.integers(0, vocab, (batch, steps)).astype(np.int32)
    y[rng.random((batch, steps)) < ignored] = -1
    y[0, 0] = max(int(y[0, 0]), 0)
    return x, y


def random_network(i: int, dtype: str) -> tuple[Network, int]:
    """Network case i (and its batch): a conv stem (1-2 convs: stride 1 or 2, SAME or
    VALID, kernels 1-5), maybe a MaxPool/AvgPool, Flatten, maybe LayerNorm, a Dense,
    every other case a residual block (Dense, LayerNorm, Dense), the output Dense.

    Over i = 0..17 every layer type, padding, stride 1 and 2, kernel size 1-5,
    every activation and loss, batch 1, one channel and 1x1 images occur; the first conv
    has no bias where i = 3 mod 4, the residual block's first Dense and LayerNorm none
    where i = 0 mod 4.
    """
    acts, losses = sorted(ACTIVATIONS), sorted(LOSSES)
    rng = np.random.default_rng(2000 + i)
    h = int(rng.integers(1, 10)) if i % 6 else 1
    w = int(rng.integers(1, 10)) if i % 6 else 1
    c = int(rng.integers(1, 4)) if i % 4 else 1
    chain: list[Any] = []
    shape = (h, w)
    for _ in range(int(rng.integers(1, 3))):
        k = (int(rng.integers(1, 6)), int(rng.integers(1, 6)))
        fits = all(size >= kk for size, kk in zip(shape, k))
        padding = "VALID" if rng.random() < 0.4 and fits else "SAME"
        conv = layers.Conv2D(int(rng.integers(1, 5)), k, int(rng.integers(1, 3)), padding,
                             acts[(i + len(chain)) % 9], bias=bool(chain) or i % 4 != 3)
        chain.append(conv)
        shape = conv.output_shape((*shape, 1))[:2]
    if min(shape) >= 2 and rng.random() < 0.7:
        chain.append(layers.MaxPool(2) if i % 2 else layers.AvgPool((2, 1)))
    chain.append(layers.Flatten())
    if i % 3 == 0:
        chain.append(layers.LayerNorm())
    width = int(rng.integers(2, 12))
    chain.append(layers.Dense(width, acts[i % 9]))
    if i % 2 == 0:
        chain.append(layers.Residual((layers.Dense(width, acts[(i + 4) % 9], bias=i % 4 != 0),
                                      layers.LayerNorm(bias=i % 4 != 0), layers.Dense(width))))
    loss = losses[i % 3]
    n_out = int(rng.integers(2, 6))
    chain.append(layers.Dense(n_out, acts[(i // 3) % 9] if not LOSSES[loss].probability_targets
                              else "identity"))
    batch = 1 if i % 5 == 0 else int(rng.integers(2, 9))
    return Network(tuple(chain), (h, w, c), loss, dtype), batch


@dataclasses.dataclass(frozen=True)
class Case:
    """One suite case: a network (MLP or Network), its data and the PRNG seed of its params."""

    net: Net
    batch: int
    seed: int
    label_targets: bool

    def describe(self) -> str:
        """``sizes act->out_act loss dtype`` on one line (the layers for a Network)."""
        if getattr(self.net, "input_dtype", None) is not None:
            (steps, dim), vocab = self.net.shapes[1], self.net.n_out
            blocks = sum(hasattr(layer, "layers") for layer in self.net.layers) // 2
            keys = {getattr(inner, "block", None) for layer in self.net.layers
                    for inner in getattr(layer, "layers", ())} - {None}
            shown = "".join(f" attention {k} keys a block" for k in sorted(keys))
            shown += " tied" * self.net.tie_embedding
            rates = {getattr(layer, "rate", None) for layer in self.net.layers} - {None}
            shown += "".join(f" dropout {rate:g}" for rate in sorted(rates))
            return (f"gpt T={steps} d={dim} blocks={blocks} vocab={vocab} B={self.batch}"
                    f"{shown} (int labels, -1 ignored)")
        if isinstance(self.net, Network):
            labels = " (int labels)" if self.label_targets else ""
            return f"{network.describe(self.net)} B={self.batch}{labels}"
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
    networks: int = 3,
    transformers: int = 2,
) -> Iterator[Case]:
    """Every (activation, loss, dtype) once, each with a random architecture; then per
    dtype ``networks`` random :class:`jaxbp.Network` s (:func:`random_network`) and
    ``transformers`` random GPTs (:func:`random_transformer`, targets with -1 tokens).

    Depth (weight layers) in ``[1, max_depth]``, widths in ``[1, max_width]``,
    batch in ``[1, max_batch]``; the output activation is drawn from all
    activations for ``squared_error`` and is ``identity`` half the time for the
    cross-entropies (logits), otherwise any other. Arguments are checked when called (a
    ValueError naming one), before the first case is drawn.
    """
    for name, value, least in (("seed", seed, 0), ("max_depth", max_depth, 1),
                               ("max_width", max_width, 1), ("max_batch", max_batch, 1),
                               ("networks", networks, 0), ("transformers", transformers, 0)):
        check_int(name, value, least)
    return _cases(np.random.default_rng(seed), dtypes, max_depth, max_width, max_batch,
                  networks, transformers)


def _cases(rng: np.random.Generator, dtypes: Sequence[str], max_depth: int, max_width: int,
           max_batch: int, networks: int, transformers: int) -> Iterator[Case]:
    """:func:`random_cases`' draws, in order."""
    names = sorted(ACTIVATIONS)
    for dtype in dtypes:
        for activation in names:
            for loss in sorted(LOSSES):
                depth = int(rng.integers(1, max_depth + 1))
                widths = rng.integers(1, max_width + 1, size=depth + 1)
                if LOSSES[loss].normalised_targets:   # a softmax needs two outputs
                    widths[-1] = max(int(widths[-1]), 2)
                out = str(rng.choice(names)) if (not LOSSES[loss].probability_targets
                                                    or rng.random() < 0.5) \
                    else "identity"
                net = MLP(tuple(int(w) for w in widths), activation, out, loss, dtype)
                labels = LOSSES[loss].integer_labels and bool(rng.random() < 0.5)
                yield Case(net, int(rng.integers(1, max_batch + 1)),
                           int(rng.integers(2**31)), labels)
        for _ in range(networks):
            net, batch = random_network(int(rng.integers(0, 10_000)), dtype)
            labels = net.loss_fn.integer_labels and bool(rng.random() < 0.5)
            yield Case(net, batch, int(rng.integers(2**31)), labels)
        for _ in range(transformers):
            net, batch = random_transformer(int(rng.integers(0, 10_000)), dtype)
            yield Case(net, batch, int(rng.integers(2**31)), True)


def case_data(case: Case) -> tuple[tuple[dict[str, Array], ...], Array, Array]:
    """Params, x and y for a case, all drawn from ``case.seed``."""
    key_p, key_x, key_y = jax.random.split(jax.random.key(case.seed), 3)
    net, dtype = case.net, jnp.dtype(case.net.dtype)
    if getattr(net, "input_dtype", None) is not None:          # a GPT: tokens
        x, y = random_tokens(np.random.default_rng(case.seed), net, case.batch)
        return net.init(key_p), jnp.asarray(x), jnp.asarray(y)
    n_out = net.n_out
    sample = net.input_shape
    x = jax.random.normal(key_x, (case.batch, *sample), dtype)
    if case.label_targets:
        y = jax.random.randint(key_y, (case.batch,), 0, n_out)
    elif net.loss_fn.normalised_targets:            # rows of probabilities
        y = jax.nn.softmax(jax.random.normal(key_y, (case.batch, n_out)) * 2).astype(dtype)
    elif net.loss_fn.probability_targets:           # each entry in [0, 1]
        y = jax.random.uniform(key_y, (case.batch, n_out), dtype)
    else:
        y = jax.random.normal(key_y, (case.batch, n_out), dtype)
    return net.init(key_p), x, y


def run_case(case: Case, n_fd: int = 2) -> GradReport:
    """verify_grads of the hand-written gradient of one case (needs x64 for float64); a
    net with dropout with the masks of a training step drawn from the case's seed."""
    params, x, y = case_data(case)
    masks = network.step_key(network.as_network(case.net), case.seed % 1000)
    return verify_mlp(case.net, params, x, y, n_fd=n_fd, key=masks)


def verify_mlp(
    net: Net, params: Params, x: ArrayLike, y: ArrayLike, n_fd: int = 2, float64: bool = False,
    key: Array | None = None
) -> GradReport:
    """verify_grads of ``backprop`` against ``jax.grad`` of ``net.cost`` at (params, x, y).

    With ``float64=True`` params, x and float targets are converted to float64
    and the check runs with 64-bit JAX switched on for its duration only: the
    same network and data, checked where FD and the Taylor test are sharp
    (a float32 FD step along a random direction crosses ReLU kinks of a wide net).
    ``key``: a training step's (:func:`jaxbp.network.step_key`): the gradient and the
    cost with that step's dropout masks, both sides the same ones; None: the evaluation
    forward (no dropout).
    """
    def grad_fn(p, x, y):
        if key is None:
            return value_and_backprop(net, p, x, y)[1]
        x, y = input_checks.check_inputs(net, p, x, y)
        return backprop_values(net, p, x, y, key)[1]

    def cost(p, x, y):
        if key is None:
            return net.cost(p, x, y)
        chain = network.as_network(net)
        return mean_loss(chain.loss_fn, network.forward(chain, p, x, key)[0], y)

    if not check_bool("float64", float64):
        return verify_grads(grad_fn, jax.jit(cost), params, x, y, n_fd=n_fd)
    with jax.enable_x64(True):
        return verify_grads(grad_fn, jax.jit(cost), jax.tree.map(to_float64, params),
                            to_float64(x), to_float64(y), n_fd=n_fd)
