"""Entry module of the streaming SSE function (a function URL with response streaming)."""

from rtqcc.api.streaming import create_stream_handler
from rtqcc.services import Services
from rtqcc.settings import Settings

handler = create_stream_handler(lambda: Services(Settings.from_env()))
