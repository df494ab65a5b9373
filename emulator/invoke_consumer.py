"""One scheduled invocation of the consumer function, in its own process:
`python -m rtqcc_emulator.invoke_consumer --budget-s 60`. SIGTERM ends it early and cleanly
(unfinished work is checkpointed and handed back), like a container being shut down."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time

from rtqcc.consumer import Consumer
from rtqcc.services import Services
from rtqcc.settings import Settings


class InvocationContext:
    """The Lambda context a scheduled invocation gets: its remaining time."""

    def __init__(self, budget_s: float):
        self._deadline = time.monotonic() + budget_s
        self.aws_request_id = f"local-{int(time.time() * 1000)}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtqcc-consumer")
    parser.add_argument("--budget-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s consumer %(process)d %(levelname)s %(message)s")
    consumer = Consumer(Services(Settings.from_env()))
    signal.signal(signal.SIGTERM, lambda *_: consumer.shut_down())
    result = consumer.drain(InvocationContext(args.budget_s).get_remaining_time_in_millis)
    print(json.dumps({"consumer": consumer.name, **result.as_dict()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
