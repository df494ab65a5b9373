"""Entry module of the streaming SSE function (a function URL with response streaming)."""

from rtqcc.api.streaming import create_stream_handler
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings

configure_logging()
handler = create_stream_handler(lambda: Services(Settings.from_env()))
