"""An etcd-backed node registry, for clusters beyond one machine: `EtcdDiscovery` (SPEC 7.5).

The implementation lives in `promptise_asgi.discovery._etcd`; this module is its public import path.
"""

from __future__ import annotations

from ._errors import EtcdError, EtcdUnavailableError
from .discovery._etcd import EtcdDiscovery

__all__ = ["EtcdDiscovery", "EtcdError", "EtcdUnavailableError"]
