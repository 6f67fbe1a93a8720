"""Properties over drawn settings (hypothesis), where a fixed list of cases could miss the one
that breaks: the conv and pool records' shapes and backward for any kernel, stride, padding
and input size, the token-wise records' backward for any heads, width, T and block, and the
arithmetic that splits data (epochs, processes, a private batch on
a mesh, text windows). A failure is shrunk to its smallest setting."""

from __future__ import annotations

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jaxbp
from jaxbp import layers as L
from jaxbp.check.leaves import compare_leaves
from jaxbp.data import epoch_order
from jaxbp.parallel import process_rows
from jaxbp.train import private

pairs = st.tuples(st.integers(1, 5), st.integers(1, 5))
conv_settings = st.fixed_dictionaries({
    "kernel": pairs, "stride": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "padding": st.sampled_from(["SAME", "VALID"]), "size": st.tuples(st.integers(1, 9),
                                                                      st.integers(1, 9)),
    "channels": st.integers(1, 3), "filters": st.integers(1, 3)})
pool_settings = st.fixed_dictionaries({
    "kind": st.sampled_from([L.MaxPool, L.AvgPool]), "window": pairs,
    "size": st.tuples(st.integers(1, 11), st.integers(1, 11)), "channels": st.integers(1, 3)})
# derandomized: CI draws the same examples every run (a red CI is a real, reproducible
# failure); JAXBP_PROPERTY_EXAMPLES=N draws N fresh ones per property instead, to explore
EXPLORE = int(os.environ.get("JAXBP_PROPERTY_EXAMPLES", "0"))
quick = settings(max_examples=EXPLORE or 60, deadline=None, derandomize=not EXPLORE,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
eager = settings(max_examples=EXPLORE // 10 or 16, deadline=None, derandomize=not EXPLORE,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _conv(s: dict) -> tuple[L.Conv2D, tuple[int, int, int]]:
    layer = L.Conv2D(s["filters"], s["kernel"], stride=s["stride"], padding=s["padding"])
    shape = (*s["size"], s["channels"])
    if s["padding"] == "VALID":   # a kernel larger than the input leaves no output
        assume(all(k <= n for k, n in zip(s["kernel"], s["size"])))
    return layer, shape


def _pool(s: dict) -> tuple[object, tuple[int, int, int]]:
    assume(all(w <= n for w, n in zip(s["window"], s["size"])))
    return s["kind"](s["window"]), (*s["size"], s["channels"])


def _shapes(layer: object, shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
    """The record's output shape, and the shapes of its forward output and its backward's
    input error, traced (jax.eval_shape: nothing compiled or run)."""
    x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    params = jax.eval_shape(lambda k: layer.init(k, shape, jnp.float32), jax.random.key(0))

    def forward_and_back(p, x):
        out, cache = layer.forward(p, x)
        return out, layer.backward(p, cache, jnp.ones_like(out))[0]

    out, error = jax.eval_shape(forward_and_back, params, x)
    return layer.output_shape(shape), out.shape[1:], error.shape


@quick
@given(s=conv_settings)
def test_a_convs_shapes_agree_for_any_kernel_stride_padding_and_size(s):
    layer, shape = _conv(s)
    said, made, error = _shapes(layer, shape)
    assert said == made and error == (2, *shape)


@quick
@given(s=pool_settings)
def test_a_pools_shapes_agree_for_any_window_and_size(s):
    layer, shape = _pool(s)
    said, made, error = _shapes(layer, shape)
    assert said == made == (shape[0] // s["window"][0], shape[1] // s["window"][1], shape[2])
    assert error == (2, *shape)


def _vjp_misses(layer: object, shape: tuple[int, ...], seed: int) -> list[str]:
    """The rows where the record's hand-written backward (input error, params) is not
    jax.vjp of its forward in float64: within 1e-12 of each array's largest entry, or 16
    ulps of the largest entry of all (verify_grads' rule: an array small because its terms
    cancel, as RMSNorm's input error over one feature, keeps its rounding). The rows and
    columns a pool's windows leave out get no error on either side."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, *shape)))
    params = layer.init(jax.random.key(seed), shape, jnp.float64)
    out, cache = layer.forward(params, x)
    delta = jnp.asarray(rng.normal(size=out.shape))
    error, grads = layer.backward(params, cache, delta)
    _, pullback = jax.vjp(lambda p, x: layer.forward(p, x)[0], params, x)
    grads_ref, error_ref = pullback(delta)
    rows = compare_leaves(["input error", *map(str, range(len(jax.tree.leaves(grads))))],
                          [error, *jax.tree.leaves(grads)],
                          [error_ref, *jax.tree.leaves(grads_ref)], rtol=1e-12, atol=None)
    return [f"{row.path}: {row.rel_error:.2e}" for row in rows if not row.ok]


@pytest.mark.slow
@eager
@given(s=st.one_of(conv_settings, pool_settings), seed=st.integers(0, 2**16))
def test_a_conv_or_pools_backward_is_the_vjp_of_its_forward_for_any_setting(x64, s, seed):
    layer, shape = (_conv if "filters" in s else _pool)(s)
    assert not _vjp_misses(layer, shape, seed)


sequence_settings = st.fixed_dictionaries({
    "kind": st.sampled_from(["attention", "layernorm", "rmsnorm", "dense", "gated"]),
    "heads": st.integers(1, 3), "head_dim": st.integers(1, 3), "T": st.integers(1, 9),
    "causal": st.booleans(), "block": st.one_of(st.none(), st.integers(1, 10)),
    "rope": st.booleans(), "base": st.sampled_from([3.0, 1e4, 5e5]),
    "kv_heads": st.sampled_from([None, 1]), "bias": st.booleans()})


@pytest.mark.slow
@eager
@given(s=sequence_settings, seed=st.integers(0, 2**16))
def test_a_token_wise_records_backward_is_the_vjp_of_its_forward(x64, s, seed):
    """SelfAttention (plain and blockwise, any block against any T, causal or not, T = 1
    included, rotary or not: a rotary head twice as wide, one key/value head per query
    head or one for all), LayerNorm, RMSNorm, a
    token-wise Dense and GatedDense on (batch, T, d) sequences; with biases (shifts) or
    without."""
    rope = s["kind"] == "attention" and s["rope"]
    d = s["heads"] * s["head_dim"] * (2 if rope else 1)
    layer = {"attention": lambda: L.SelfAttention(s["heads"], causal=s["causal"],
                                                  block=s["block"], rope=rope,
                                                  rope_base=s["base"],
                                                  kv_heads=s["kv_heads"], bias=s["bias"]),
             "layernorm": lambda: L.LayerNorm(bias=s["bias"]), "rmsnorm": L.RMSNorm,
             "dense": lambda: L.Dense(s["heads"] + 1, "gelu", bias=s["bias"]),
             "gated": lambda: L.GatedDense(s["heads"] + 1, bias=s["bias"])}[s["kind"]]()
    assert not _vjp_misses(layer, (s["T"], d), seed)


@quick
@given(n=st.integers(1, 300), batch=st.integers(1, 64), drop_last=st.booleans(),
       seed=st.integers(0, 2**16))
def test_an_epoch_takes_every_row_once(n, batch, drop_last, seed):
    full, tail = epoch_order(n, batch, jax.random.key(seed), drop_last)
    taken = np.concatenate([full.ravel(), [] if tail is None else tail]).astype(int)
    if drop_last:
        assert len(taken) == n - n % batch and len(set(taken)) == len(taken)
    else:
        assert sorted(taken) == list(range(n))
    assert full.shape == (n // batch, batch)


@quick
@given(count=st.integers(1, 8), per_process=st.integers(0, 9), width=st.integers(1, 3))
def test_the_processes_rows_tile_the_global_batch(count, per_process, width):
    batch = np.arange(count * per_process * width).reshape(count * per_process, width)
    parts = [process_rows(batch, i, count) for i in range(count)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)


@quick
@given(max_batch=st.integers(1, 500), data=st.integers(1, 16))
def test_a_private_batch_on_a_mesh_is_padded_to_split_and_no_further(max_batch, data):
    plan = private.Plan(privacy=None, rate=0.1, steps_per_epoch=1, sigma=1.0,
                        max_batch=max_batch, n_train=1000)
    mesh = types.SimpleNamespace(shape={jaxbp.parallel.DATA: data})
    padded = plan.on_mesh(mesh).max_batch
    split = np.lcm(data, jax.process_count())
    assert padded % split == 0 and max_batch <= padded < max_batch + split
    assert plan.on_mesh(None) is plan


@quick
@given(text=st.one_of(   # 70+ characters: a window of 7 in the last tenth
    st.text(st.sampled_from("ab \n\r\ufeffé€"), min_size=70, max_size=300),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=70,
            max_size=300)), seq_len=st.integers(1, 6))
def test_a_users_text_becomes_next_character_windows(tmp_path, text, seq_len):
    """Windows of the text as read: line ends as "\n" (Python's universal newlines, so a
    Windows file has the vocabulary of its Unix copy), a leading byte-order mark dropped."""
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8", newline="")
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    assume(len(set(text)) > 1)
    try:
        data = jaxbp.data.load_text(path, seq_len=seq_len)
    except ValueError as err:          # too short for a window in one of its two parts
        assert "too short for one window" in str(err)
        assume(False)
    assert list(data.vocab) == sorted(set(text))
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.shape == y.shape and x.shape[1] == seq_len
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x, y):
            window = data.decode(row_x) + data.decode(row_y[-1:])
            assert window in text
            np.testing.assert_array_equal(data.encode(window)[:-1], row_x)
