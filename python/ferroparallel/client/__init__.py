"""The client side: Client, views, AsyncResults."""

from __future__ import annotations

from .asyncresult import AsyncHubResult, AsyncMapResult, AsyncResult
from .client import Client
from .view import DirectView, LoadBalancedView, View

__all__ = [
    "AsyncHubResult",
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "DirectView",
    "LoadBalancedView",
    "View",
]
