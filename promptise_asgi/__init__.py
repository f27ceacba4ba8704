"""promptise-asgi: run, discover and steer distributed agent processes over HTTP."""

from __future__ import annotations
