"""`./dev bench`: run the benchmarks, print the figures, write them to bench/results.json."""

from __future__ import annotations

import argparse
import json
import platform
import os
from pathlib import Path

from . import abort_latency, cold_start, control_latency, peers, scale, sse_delivery, throughput
from .stack import bench_settings

BENCHES = {"throughput": throughput.run, "control": control_latency.run,
           "sse": sse_delivery.run, "abort": abort_latency.run,
           "cold_start": cold_start.run, "peers": peers.run, "scale": scale.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHES, []], help="which to run (default: all)")
    parser.add_argument("--output", default=str(Path(__file__).with_name("results.json")))
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    with bench_settings() as settings:
        for name in args.names or BENCHES:
            results[name] = BENCHES[name](settings)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
