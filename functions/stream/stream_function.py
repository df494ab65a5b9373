"""Entry module of the streaming SSE function (a function URL with response streaming)."""

import os

from rtqcc import tracing
from rtqcc.api.streaming import create_stream_handler
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings


def _services() -> Services:
    settings = Settings.from_env()
    settings.check_serving()  # a deployment missing a secret serves nothing and logs what to set
    return Services(settings)


configure_logging()
tracing.configure(tracing.TracingSettings.from_env(os.environ))  # unset: nothing of OpenTelemetry imported
handler = create_stream_handler(_services)
