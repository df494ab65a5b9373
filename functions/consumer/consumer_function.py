"""Entry module of the consumer function, invoked on a schedule with a time budget."""

from rtqcc.run.consumer import lambda_handler
from rtqcc.services import Services
from rtqcc.settings import Settings

handler = lambda_handler(lambda: Services(Settings.from_env()))
