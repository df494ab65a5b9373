"""Entry module of the API function (Chalice requires the name app.py)."""

from rtqcc.api import create_app
from rtqcc.services import Services
from rtqcc.settings import Settings

app = create_app(lambda: Services(Settings.from_env()))
