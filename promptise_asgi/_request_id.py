"""Request ids (SPEC 15): the id of the request being served, so the calls made for it can carry it on.

A context variable set by the apps for each request and read by the clients the coordinator calls nodes
with. Knows nothing of HTTP frameworks.
"""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

__all__ = ["CURRENT_REQUEST_ID", "accepted_request_id", "new_request_id"]

CURRENT_REQUEST_ID: ContextVar[str | None] = ContextVar("promptise_asgi_request_id", default=None)

_VALID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


def accepted_request_id(value: bytes | None) -> str | None:
    """A client's `X-Request-ID`, if it is 1-128 characters of `[A-Za-z0-9._-]` (anything else is replaced)."""
    if value is not None and _VALID.fullmatch(value):
        return value.decode("ascii")
    return None


def new_request_id() -> str:
    """A fresh id: 32 random hex characters."""
    return os.urandom(16).hex()
