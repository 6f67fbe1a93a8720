"""Run with 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): fit over a
mesh against fit on one device, and resume across formats and device counts. Prints one
line per check; exits 1 on failure. argv[1]: a scratch folder."""

from __future__ import annotations

import pathlib
import re
import sys
import time

import jax
import numpy as np
import optax

import jaxbp
from jaxbp import parallel
from jaxbp.train import checkpoint, sharded_checkpoint

NET = jaxbp.MLP((64, 32, 32, 10), "tanh")
ARGS = {"epochs": 2, "batch_size": 64, "key": jax.random.key(3), "progress": False}


def leaves(state) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(parallel.fetch(state))]


def max_rel(a, b) -> float:
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
               for x, y in zip(leaves(a), leaves(b)))


def report(name: str, ok: bool, detail: str) -> bool:
    print(f"{'ok' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def main(scratch: pathlib.Path) -> int:
    assert jax.device_count() == 8, jax.devices()
    digits = jaxbp.data.load_digits()
    optimizer = optax.sgd(0.05, momentum=0.9)
    results = []

    single = jaxbp.fit(NET, optimizer, digits, **ARGS)
    for data, model in ((8, 1), (4, 2)):
        mesh = parallel.make_mesh(data, model)
        meshed = jaxbp.fit(NET, optimizer, digits, mesh=mesh, **ARGS)
        diff = max_rel(meshed.state.params, single.state.params)
        acc = abs(meshed.history["test_accuracy"][-1] - single.history["test_accuracy"][-1])
        results.append(report(f"fit on mesh ({data}, {model})", diff < 1e-5 and acc <= 1 / 359,
                              f"max rel param diff vs one device {diff:.2e}, test accuracy "
                              f"diff {acc:.4f}"))

    mesh = parallel.make_mesh(4, 2)
    # a mesh run stopped after epoch 1 and resumed: bit for bit the uninterrupted one
    whole = jaxbp.fit(NET, optimizer, digits, mesh=mesh, **ARGS)
    folder = scratch / "mesh"
    start = time.perf_counter()
    jaxbp.fit(NET, optimizer, digits, mesh=mesh, checkpoint_dir=folder, **(ARGS | {"epochs": 1}))
    save_s = time.perf_counter() - start
    steps = sharded_checkpoint.list_steps(folder)
    resumed = jaxbp.fit(NET, optimizer, digits, mesh=mesh, checkpoint_dir=folder, **ARGS)
    same = all(np.array_equal(a, b) for a, b in zip(leaves(resumed.state), leaves(whole.state)))
    placed = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(resumed.state), jax.tree.leaves(parallel.state_shardings(
            resumed.state, mesh, net=NET))))
    results.append(report("mesh resume", same and placed and steps == [1],
                          f"bit-identical {same}, shardings kept {placed}, steps {steps}, "
                          f"1-epoch run with its save {save_s:.2f} s"))

    # one device (.npz) -> 8 devices: the restored state is the saved one, bit for bit
    folder = scratch / "one_to_eight"
    first = jaxbp.fit(NET, optimizer, digits, checkpoint_dir=folder, **(ARGS | {"epochs": 1}))
    template = {"state": first.state, "key": jax.random.split(ARGS["key"])[1]}
    saved, _ = checkpoint.restore(checkpoint.list_checkpoints(folder)[-1], template)
    grown = jaxbp.fit(NET, optimizer, digits, mesh=mesh, checkpoint_dir=folder, **ARGS)
    diff = max_rel(grown.state.params, single.state.params)
    exact = all(np.array_equal(a, b) for a, b in zip(leaves(saved["state"]),
                                                      leaves(first.state)))
    results.append(report("1 device -> 8", exact and diff < 1e-5 and
                          sharded_checkpoint.list_steps(folder) == [2],
                          f"npz restored exactly {exact}; after epoch 2 on the mesh max rel "
                          f"param diff vs one device {diff:.2e}"))
    # 8 devices (orbax) -> one device: resumes on one device from the mesh's checkpoint
    back = jaxbp.fit(NET, optimizer, digits, checkpoint_dir=folder, **(ARGS | {"epochs": 3}))
    reference = jaxbp.fit(NET, optimizer, digits, **(ARGS | {"epochs": 3}))
    diff = max_rel(back.state.params, reference.state.params)
    on_one = {d for leaf in jax.tree.leaves(back.state) for d in leaf.devices()}
    results.append(report("8 devices -> 1", diff < 1e-5 and len(on_one) == 1
                          and back.history["epoch"] == [1, 2, 3],
                          f"after epoch 3 on one device max rel param diff {diff:.2e}, "
                          f"devices {len(on_one)}"))
    results.extend(private_checks(digits, scratch))
    return 0 if all(results) else 1


def private_checks(digits: jaxbp.data.Dataset, scratch: pathlib.Path) -> list[bool]:
    """DP-SGD over a mesh: the padded Poisson batch rounded up to split over the data axis,
    the same draws, clipped sum and noise as on one device (an MLP; a GPT's attention and
    embedding too), the same epsilon; resumed bit for bit; the plain loop's collectives."""
    from jaxbp.privacy import Privacy

    privacy = Privacy(1.0, 1e-5, noise_multiplier=1.0)
    text = jaxbp.data.load_text(seq_len=8)
    short = jaxbp.data.Dataset(text.x_train[:240], text.y_train[:240], text.x_test[:16],
                               text.y_test[:16])
    gpt = jaxbp.models.gpt(len(text.vocab), 8, 1, 2, 8)
    results = []
    for name, net, data, batch, meshes in (("MLP", NET, digits, 60, ((8, 1), (4, 2))),
                                           ("GPT", gpt, short, 30, ((4, 2),))):
        args = ARGS | {"epochs": 1, "batch_size": batch, "privacy": privacy}
        single = jaxbp.fit(net, optax.adam(1e-2), data, **args)
        for data_axis, model_axis in meshes:
            meshed = jaxbp.fit(net, optax.adam(1e-2), data,
                               mesh=parallel.make_mesh(data_axis, model_axis), **args)
            diff = max_rel(meshed.state.params, single.state.params)
            same = meshed.history["epsilon"] == single.history["epsilon"]
            results.append(report(f"private {name} on mesh ({data_axis}, {model_axis})",
                                  diff < 1e-5 and same and int(meshed.state.step) > 1,
                                  f"max rel param diff vs one device {diff:.2e}, epsilon "
                                  f"{meshed.history['epsilon']} (one device "
                                  f"{single.history['epsilon']})"))
    # a private mesh run stopped after epoch 1 and resumed: bit for bit the uninterrupted one
    mesh, args = parallel.make_mesh(4, 2), ARGS | {"batch_size": 60, "privacy": privacy}
    whole = jaxbp.fit(NET, optax.adam(1e-2), digits, mesh=mesh, **args)
    folder = scratch / "private_mesh"
    jaxbp.fit(NET, optax.adam(1e-2), digits, mesh=mesh, checkpoint_dir=folder,
              **(args | {"epochs": 1}))
    resumed = jaxbp.fit(NET, optax.adam(1e-2), digits, mesh=mesh, checkpoint_dir=folder, **args)
    same = all(np.array_equal(a, b) for a, b in zip(leaves(resumed.state), leaves(whole.state)))
    results.append(report("private mesh resume", same and resumed.history["epsilon"]
                          == whole.history["epsilon"], f"bit-identical {same}, epsilon "
                          f"{resumed.history['epsilon']}"))
    # the clipped per-example sum is local to each device's rows: the DP loop's compiled
    # program has the plain loop's collectives, one for one (no batch gathered)
    mesh, x, y = parallel.make_mesh(4, 2), np.zeros((1, 64, 64), np.float32), np.zeros(
        (1, 64), np.int32)
    found = {}
    for name, source, masks in (
            ("plain", "backprop", ()),
            ("dp", jaxbp.sources.dp_sgd(1.0, 1.0, jax.random.key(0), expected_batch_size=32.0),
             (np.ones((1, 64), bool),))):
        loop = parallel.make_sharded_train_loop(NET, optax.adam(1e-2), mesh, 1, source)
        state = jaxbp.TrainState.create(NET.init(jax.random.key(0)), optax.adam(1e-2))
        text = loop.lower(state, x, y, *masks).compile().as_text()
        found[name] = sorted(re.findall(
            r" (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\(", text))
    results.append(report("private loop collectives", found["dp"] == found["plain"],
                          f"dp {found['dp']}, plain {found['plain']}"))
    return results


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1])))
