"""``hiddenpool.ray``: Ray Data (``encode_dataset``, from ``hiddenpool.integrations.ray``)
and Ray Serve (``serve_app``: replicas of ``hiddenpool serve`` behind Ray Serve's proxy,
from ``hiddenpool.server.ray_serve``; needs the ``ray-serve`` extra)."""

from typing import Any

from hiddenpool.integrations.ray import *  # noqa: F403
from hiddenpool.integrations.ray import __all__ as _data_names


def serve_app(model: Any = None, **options: Any) -> Any:
    """A Ray Serve application of ``hiddenpool serve`` replicas, for ``serve.run``
    (``hiddenpool.server.ray_serve.serve_app``, where every option is described)."""
    from hiddenpool.server.ray_serve import serve_app as build

    return build(model, **options)


__all__ = [*_data_names, "serve_app"]
