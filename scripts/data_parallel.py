"""Data-parallel training of the digits MLP over every device (public API only).

    python scripts/data_parallel.py                       # all local devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/data_parallel.py
    python scripts/data_parallel.py --model 2             # 2-D mesh: data x model

On several hosts, start the same command in every process with JAXBP_COORDINATOR,
JAXBP_NUM_PROCESSES and JAXBP_PROCESS_ID set (or on a TPU pod / Slurm, none) and
--distributed: each process then feeds its own rows of every global batch.
"""

from __future__ import annotations

from jaxbp import parallel
from jaxbp.cli.common import OneLineParser


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=int, default=1, help="devices on the model axis")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--distributed", action="store_true", help="call parallel.initialize()")
    args = parser.parse_args()
    if args.distributed:
        parallel.initialize()

    import jax
    import optax

    import jaxbp

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 256, 256, 10), "relu")
    optimizer = optax.adam(1e-3)
    mesh = parallel.make_mesh(model=args.model)
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
          f"({jax.process_count()} process(es))")
    step = parallel.make_sharded_train_step(net, optimizer, mesh)
    key = jax.random.key(0)
    state = jaxbp.TrainState.create(net.init(key), optimizer)
    for epoch in range(args.epochs):
        for x, y in jaxbp.data.batches(digits.x_train, digits.y_train, args.batch_size,
                                       jax.random.fold_in(key, epoch), drop_last=True):
            state, metrics = step(state, parallel.process_rows(x), parallel.process_rows(y))
        params, loss = parallel.fetch((state.params, metrics["loss"]))
        test = jaxbp.evaluate(net, params, digits.x_test, digits.y_test)
        print(f"epoch {epoch + 1}: train loss {float(loss):.4f}, "
              f"test accuracy {test['accuracy']:.4f}")


if __name__ == "__main__":
    main()
