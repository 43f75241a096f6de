"""``python -m ray_alpcrun.demo``: the whole system on this machine, in one command.

Starts Ray, the local ALPCRUN.CH services (queue manager, central and node
cache) and the bridge, then prices a book of European and Asian options by
Monte Carlo (``ray_alpcrun/examples/monte_carlo``) through the client, with a progress
bar, and prints the prices, the Black-Scholes check and the throughput.
The example ships inside the package: it runs from any directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ray_alpcrun import errors
from ray_alpcrun.clikit import Parser


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m ray_alpcrun.demo", description=__doc__)
    p.add_argument("--tasks", type=int, default=64, help="pricing tasks to submit")
    p.add_argument("--paths", type=int, default=5_000, help="Monte Carlo paths per task")
    p.add_argument("--contracts", type=int, default=48, help="options in the book")
    p.add_argument("--batch-size", type=int, default=8, help="tasks per batch")
    p.add_argument("--actors", type=int, default=2, help="Ray actors in the pool")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="0 = NumPy on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import ray

    from ray_alpcrun.bridge.launch import start_bridge
    from ray_alpcrun.config import BridgeConfig, PoolConfig
    from ray_alpcrun.devserver import LocalServices
    from ray_alpcrun.examples.monte_carlo import client as mc

    market, contracts = mc.build_book(n_contracts=args.contracts)
    tasks = mc.make_tasks(contracts, args.paths, args.tasks, contracts_per_task=16)
    print(
        f"demo: {len(tasks)} tasks x {args.paths:,} paths over {args.contracts} options, "
        f"{args.actors} Ray actor(s), batches of {args.batch_size}",
        flush=True,
    )
    # Ray first: starting it after gRPC is active prints fork warnings.
    # A Ray of its own, even beside a cluster that `ray start` left running here.
    ray.init(address="local", configure_logging=False, log_to_driver=True, include_dashboard=False)
    try:
        with LocalServices() as services:
            print(
                f"local services: queue {services.queue_address}, central cache "
                f"{services.central_cache_address}, node cache {services.node_cache_address}",
                flush=True,
            )
            config = BridgeConfig(
                services=services.service_config(),
                handler=mc.HANDLER,
                pool=PoolConfig(num_actors=args.actors, gpus_per_actor=args.gpus_per_actor),
                log_level="warning",
            )
            started = time.perf_counter()
            bridge = start_bridge(config)
            try:
                bridge.wait_ready(timeout_s=120.0)
                print(f"bridge ready in {time.perf_counter() - started:.1f} s", flush=True)
                results, elapsed = mc.run_on_grid(
                    market,
                    tasks,
                    queue=services.queue_address,
                    central_cache=services.central_cache_address,
                    api_key=services.api_key,
                    batch_size=args.batch_size,
                    progress=not args.no_progress,
                )
                status = ray.get(bridge.status(), timeout=30)
            finally:
                ray.get(bridge.stop(drain=True), timeout=60)
                code, reason = ray.get(bridge.run_ref, timeout=60)
    finally:
        ray.shutdown()
    mc.summarise(market, contracts, results, elapsed)
    print(
        f"throughput: {len(tasks) / elapsed:,.1f} tasks/s through client -> queue manager -> "
        f"bridge -> {args.actors} actors -> client; shared data fetched "
        f"{status['shared_fetches']} time(s) by the bridge"
    )
    if code != errors.EXIT_OK:
        print(f"bridge exited with {code}: {reason}", file=sys.stderr)
        return int(code)
    return errors.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
