"""The async clients for a node's HTTP API (SPEC section 3) and a coordinator's (SPEC 8.2), on httpx and anyio.

`NodeClient` turns every answer into decoded JSON or into one of the node errors (`NodeError`,
`NodeUnreachableError`, `NodeTimeoutError`); `CoordinatorClient` does the same for a coordinator, with errors
that name it (`CoordinatorError`, ...). Both read change streams as `Change`s. Implemented in `_client`.
"""

from __future__ import annotations

from ._changes import Change
from ._client import ChangeStream, CoordinatorClient, NodeClient
from ._errors import (
    CoordinatorError,
    CoordinatorTimeoutError,
    CoordinatorUnreachableError,
    NodeError,
    NodeResponseTooLargeError,
    NodeTimeoutError,
    NodeUnreachableError,
)

__all__ = [
    "Change",
    "ChangeStream",
    "CoordinatorClient",
    "CoordinatorError",
    "CoordinatorTimeoutError",
    "CoordinatorUnreachableError",
    "NodeClient",
    "NodeError",
    "NodeResponseTooLargeError",
    "NodeTimeoutError",
    "NodeUnreachableError",
]
