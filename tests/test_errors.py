"""Bad input: the exception type and a message naming the argument, the expected and the actual."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp

NET = jaxbp.MLP((4, 5, 3), "relu", loss="softmax_cross_entropy")
SQ = jaxbp.MLP((4, 5, 3), "tanh", loss="squared_error")
PARAMS = NET.init(jax.random.key(0))
REGRESSION = jaxbp.MLP((4, 5, 1), loss="squared_error")   # one target per sample
REGRESSION_PARAMS = REGRESSION.init(jax.random.key(0))
X = np.ones((6, 4), np.float32)
Y = np.eye(3, dtype=np.float32)[np.arange(6) % 3]
LABELS = np.arange(6) % 3


def _with(layer: int, key: str, value):
    params = [dict(p) for p in PARAMS]
    params[layer][key] = value
    return tuple(params)


# (id, call, exception type, substrings the message must contain)
CASES = [
    ("x rank 1", lambda: jaxbp.backprop(NET, PARAMS, np.ones(4, np.float32), Y),
     ValueError, ["x has shape (4,)", "expected (batch, 4)"]),
    ("x rank 3", lambda: jaxbp.backprop(NET, PARAMS, np.ones((6, 4, 1), np.float32), Y),
     ValueError, ["x has shape (6, 4, 1)", "expected (batch, 4)"]),
    ("x width", lambda: jaxbp.backprop(NET, PARAMS, np.ones((6, 7), np.float32), Y),
     ValueError, ["x has shape (6, 7)", "expected (batch, 4)", "sizes[0] = 4"]),
    ("x integer", lambda: jaxbp.backprop(NET, PARAMS, np.ones((6, 4), np.int32), Y),
     TypeError, ["x must have a floating dtype", "got int32"]),
    ("x bool", lambda: NET.apply(PARAMS, np.ones((6, 4), bool)),
     TypeError, ["x must have a floating dtype", "got bool"]),
    ("x empty batch", lambda: jaxbp.backprop(NET, PARAMS, np.ones((0, 4), np.float32), Y[:0]),
     ValueError, ["x has shape (0, 4)", "batch is empty"]),
    ("x string", lambda: NET.apply(PARAMS, "data"),
     TypeError, ["x must be a numeric array", "str"]),
    ("y batch", lambda: jaxbp.backprop(SQ, PARAMS, X, np.ones((5, 3), np.float32)),
     ValueError, ["y has shape (5, 3)", "expected (6, 3)", "batch of x = 6"]),
    ("y width", lambda: jaxbp.backprop(SQ, PARAMS, X, np.ones((6, 2), np.float32)),
     ValueError, ["y has shape (6, 2)", "expected (6, 3)", "n_out = sizes[-1] = 3"]),
    ("y rank 1 for squared error", lambda: jaxbp.backprop(SQ, PARAMS, X, LABELS),
     ValueError, ["y has shape (6,)", "expected (6, 3)", "'squared_error'",
                  "class labels take softmax_cross_entropy, or one-hot them: np.eye(3)[y]"]),
    ("regression targets as a vector", lambda: jaxbp.backprop(
        REGRESSION, REGRESSION_PARAMS, X, np.ones(6, np.float32)),
     ValueError, ["y has shape (6,)", "expected (6, 1)", "one target per sample as a column: "
                                                        "y[:, None]"]),
    ("y one-hot width", lambda: jaxbp.backprop(NET, PARAMS, X, np.ones((6, 4), np.float32)),
     ValueError, ["y has shape (6, 4)", "expected (6, 3) or (6,) integer labels"]),
    ("float labels", lambda: jaxbp.backprop(NET, PARAMS, X, LABELS.astype(np.float32)),
     TypeError, ["y of shape (6,)", "integer dtype", "got float32"]),
    ("label too large", lambda: jaxbp.backprop(NET, PARAMS, X, np.array([0, 1, 2, 3, 0, 1])),
     ValueError, ["labels outside [0, 3)", "y[3] = 3"]),
    ("label negative", lambda: jaxbp.value_and_autodiff(NET, PARAMS, X, [0, -1, 2, 0, 1, 2]),
     ValueError, ["labels outside [0, 3)", "y[1] = -1"]),
    ("labels batch", lambda: jaxbp.backprop(NET, PARAMS, X, LABELS[:4]),
     ValueError, ["y has shape (4,)", "expected (6,) integer labels", "batch of x is 6"]),
    ("y string", lambda: NET.cost(PARAMS, X, "abc"),
     TypeError, ["y must be a numeric array"]),
    ("params layers", lambda: jaxbp.backprop(NET, PARAMS[:1], X, Y),
     ValueError, ["params has 1 layers", "expected 2", "sizes (4, 5, 3)"]),
    ("params w shape", lambda: jaxbp.backprop(NET, _with(0, "w", np.ones((5, 4))), X, Y),
     ValueError, ["params[0]['w'] has shape (5, 4)", "expected (4, 5)"]),
    ("params b shape", lambda: jaxbp.backprop(NET, _with(1, "b", np.ones((1, 3))), X, Y),
     ValueError, ["params[1]['b'] has shape (1, 3)", "expected (3,)"]),
    ("params two bad leaves", lambda: jaxbp.backprop(
        NET, _with(0, "b", np.ones(4)) [:1] + _with(1, "w", np.ones((3, 3)))[1:], X, Y),
     ValueError, ["params[0]['b'] has shape (4,)", "params[1]['w'] has shape (3, 3)"]),
    ("params missing key", lambda: jaxbp.backprop(NET, ({"w": PARAMS[0]["w"]}, PARAMS[1]), X, Y),
     TypeError, ["params[0] must be a dict with keys ['b', 'w']", "got ['w']"]),
    ("params a dict", lambda: jaxbp.backprop(NET, {"w": 1}, X, Y),
     TypeError, ["params must be a tuple of 2 dicts", "got dict"]),
    ("params integer", lambda: jaxbp.backprop(
        NET, jax.tree.map(lambda a: np.asarray(a).astype(np.int32), PARAMS), X, Y),
     TypeError, ["params must all share one floating dtype", "int32"]),
    ("params mixed dtypes", lambda: jaxbp.backprop(
        NET, _with(0, "b", np.zeros(5, jnp.bfloat16)), X, Y),
     TypeError, ["params must all share one floating dtype", "bfloat16", "float32"]),
    ("manual vjp x width", lambda: jaxbp.apply_with_manual_vjp(NET, PARAMS, np.ones((2, 3))),
     ValueError, ["x has shape (2, 3)", "expected (batch, 4)"]),
    ("sizes with 0", lambda: jaxbp.MLP((4, 0, 3)),
     ValueError, ["sizes must all be >= 1", "(4, 0, 3)"]),
    ("sizes too short", lambda: jaxbp.MLP((4,)),
     ValueError, ["sizes must have at least 2 entries", "(4,)"]),
    ("sizes floats", lambda: jaxbp.MLP((4, 2.5, 3)),
     TypeError, ["sizes must hold ints", "2.5"]),
    ("sizes an int", lambda: jaxbp.MLP(4),
     TypeError, ["sizes must be a sequence of ints", "int"]),
    ("unknown activation", lambda: jaxbp.MLP((4, 5, 3), "swish"),
     ValueError, ["Unknown activation 'swish'", "'relu'", "'gelu'"]),
    ("unknown output activation", lambda: jaxbp.MLP((4, 3), output_activation="softmax"),
     ValueError, ["Unknown output_activation 'softmax'", "'identity'"]),
    ("unknown loss", lambda: jaxbp.MLP((4, 3), loss="mse"),
     ValueError, ["Unknown loss 'mse'", "'squared_error'", "'softmax_cross_entropy'"]),
    ("activation list length", lambda: jaxbp.MLP((4, 5, 6, 3), ["relu"]),
     ValueError, ["activation has 1 names but expected 2", "one per hidden layer"]),
    ("activation list entry", lambda: jaxbp.MLP((4, 5, 6, 3), ["relu", "nope"]),
     ValueError, ["Unknown activation[1] 'nope'"]),
    ("dtype", lambda: jaxbp.MLP((4, 3), dtype="int32"),
     ValueError, ["dtype must be one of", "'int32'"]),
]


@pytest.mark.parametrize("call,error,parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, error, parts):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


def test_at_least_twenty_cases():
    assert len(CASES) >= 20


def _compiles_during(call) -> list[str]:
    """The XLA backend compilations that happen while ``call`` runs (caches cleared), or
    the executables loaded from the suite's persistent compilation cache in their place."""
    compiles = []

    def listener(event, duration, **kwargs):
        if "backend_compile" in event or "cache_retrieval" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.clear_caches()
        call()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return compiles


CALL_CASES = [c for c in CASES if "sizes" not in c[0] and "activation" not in c[0]]


@pytest.mark.parametrize("call,error,parts", [c[1:] for c in CALL_CASES],
                         ids=[c[0] for c in CALL_CASES])
def test_raised_before_xla_compiles_anything(call, error, parts):
    def failing_call():
        with pytest.raises(error):
            call()

    assert _compiles_during(failing_call) == []


def test_compile_listener_sees_a_valid_call():
    """The control for the test above: a good call does compile."""
    assert _compiles_during(lambda: jaxbp.backprop(NET, PARAMS, X, Y)) != []


def test_shape_errors_raise_at_trace_time_under_jit():
    step = jax.jit(jaxbp.backprop, static_argnums=0)
    with pytest.raises(ValueError, match=r"x has shape \(6, 7\) but expected \(batch, 4\)"):
        step(NET, PARAMS, np.ones((6, 7), np.float32), Y)


def test_float64_net_needs_x64():
    with pytest.raises(ValueError, match="dtype 'float64' needs 64-bit JAX"):
        jaxbp.MLP((2, 2), dtype="float64").init(jax.random.key(0))
