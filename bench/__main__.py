"""`./dev bench`: run the benchmarks, print the figures, and keep them in
bench/results/<YYYY-MM-DD>.json with the machine's description (`python -m bench.report` then
regenerates the table in bench/README.md from the latest file)."""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from . import (abort_latency, capacity, cold_start, control_latency, lambda_burst, peers, rate_limits, scale, sse_delivery,
               throughput, token_latency)
from .record import describe_machine, python_loop_ms, record, results_path
from .stack import bench_settings

BENCHES = {"throughput": throughput.run, "control": control_latency.run,
           "sse": sse_delivery.run, "abort": abort_latency.run,
           "cold_start": cold_start.run, "peers": peers.run, "scale": scale.run, "capacity": capacity.run,
           "rate_limits": rate_limits.run, "token_latency": token_latency.run, "lambda_burst": lambda_burst.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("names", nargs="*", choices=[*BENCHES, []], help="which to run (default: all)")
    parser.add_argument("--output", type=Path, default=None,
                        help="the results file (default: bench/results/<today, UTC>.json, or .2.json"
                             " and on for another machine the same day)")
    args = parser.parse_args()
    with bench_settings() as settings:
        machine = describe_machine(settings)
        output = args.output or results_path(machine)
        for name in args.names or BENCHES:
            loop_ms = python_loop_ms()
            started, load_before = datetime.now(timezone.utc), os.getloadavg()[0]
            figures = BENCHES[name](settings)
            record(output, machine, name, figures, started=started, load_avg=[load_before, os.getloadavg()[0]],
                   loop_ms=loop_ms)
            print(f"{name}: {json.dumps(figures)}", flush=True)
    print(f"written to {output}; `python -m bench.report` puts the latest figures into bench/README.md")


if __name__ == "__main__":
    main()
