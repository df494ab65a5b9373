"""One scheduled invocation of the consumer function, in its own process:
`python -m rtqcc_emulator.invoke_consumer --budget-s 60`. SIGTERM ends it early and cleanly
(unfinished work is checkpointed and handed back), like a container being shut down."""

from __future__ import annotations

import argparse
import json
import signal
import sys

from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtqcc-consumer")
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    configure_logging()
    consumer = Consumer(Services(Settings.from_env()))
    signal.signal(signal.SIGTERM, lambda *_: consumer.shut_down())
    result = consumer.drain(TimeBudget(args.budget_s).get_remaining_time_in_millis)
    print(json.dumps({"consumer": consumer.name, **result.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
