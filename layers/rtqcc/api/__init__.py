"""The HTTP API as a Chalice app: routes, request and answer models, auth, stream tokens and
rate limits."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so the clients' wiring (services) can use the API's guards without
    # loading every route, and the routes can use the wiring.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
