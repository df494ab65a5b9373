"""The API function: a Chalice app whose routes are declared in job_routes.py,
revision_routes.py, webhook_routes.py, operation_routes.py and usage_routes.py and mounted behind one edge (api/edge.py: log context, errors as JSON)."""

from __future__ import annotations

from typing import Callable

from chalice import Chalice

from ..delivery.formats import BINARY_MEDIA_TYPES
from ..services import Services
from . import job_routes, operation_routes, revision_routes, usage_routes, webhook_routes
from .edge import LazyServices, ThreadSafeChalice, mount

# Importing them fills the route table with their @route declarations.
ROUTE_MODULES = (job_routes, revision_routes, webhook_routes, operation_routes, usage_routes)


def create_app(services_factory: Callable[[], Services], *, app_name: str = "rtqcc-api") -> Chalice:
    app = ThreadSafeChalice(app_name=app_name)
    app.api.binary_types.extend(BINARY_MEDIA_TYPES)  # the DOCX and PDF exports
    mount(app, LazyServices(services_factory))
    return app
