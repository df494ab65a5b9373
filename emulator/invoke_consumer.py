"""One scheduled invocation of the consumer function, in its own process:
`python -m rtqcc_emulator.invoke_consumer --budget-s 60`. It is `rtqcc consume` without `--loop`
(one home for the consumer loop and its signals): SIGTERM ends it early and cleanly (unfinished
work is checkpointed and handed back), like a container being shut down."""

from __future__ import annotations

import argparse
import sys

from rtqcc.cli import main as rtqcc_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtqcc-consumer")
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    return rtqcc_main(["consume", "--budget-s", str(args.budget_s)])


if __name__ == "__main__":
    sys.exit(main())
