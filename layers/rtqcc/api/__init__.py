"""The HTTP API as a Chalice app."""

from .app import create_app

__all__ = ["create_app"]
