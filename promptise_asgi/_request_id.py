"""Request ids (SPEC 15): the id of the request being served, so the calls made for it can carry it on.

A context variable set by the apps for each request and read by the clients the coordinator calls nodes
with. Knows nothing of HTTP frameworks.
"""

from __future__ import annotations

import itertools
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


class _RequestIds:
    """Ids unique across processes and restarts: 16 random hex characters per process, then a counter.

    A read of the system's randomness per request would cost a tenth of a node's time on its fastest route.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex() + "-"
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):x}"


new_request_id = _RequestIds()
# A forked child must not hand out its parent's ids.
os.register_at_fork(after_in_child=new_request_id.reset)
