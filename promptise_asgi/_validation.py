"""Boundary validation shared by discovery, the coordinator and its HTTP app.

Pure functions: no I/O, no knowledge of Starlette or httpx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = ["NODE_ID_PATTERN", "clean_token", "normalize_url", "validate_metadata", "validate_node_id"]

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)


def validate_node_id(node_id: object) -> str:
    """Return `node_id` if it is a valid node id, else raise `ValueError` naming the rule."""
    if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"node_id must match {NODE_ID_PATTERN}")
    return node_id


def normalize_url(url: object) -> str:
    """Return an http(s) URL with trailing slashes stripped, else raise `ValueError`."""
    if not isinstance(url, str):
        raise ValueError("url must be an http(s) URL")
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("url must be an http(s) URL")
    return url.strip().rstrip("/")


def validate_metadata(metadata: object) -> dict[str, Any]:
    """Return a fresh JSON-serialisable dict copy of `metadata` (None means empty), else raise `ValueError`."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise ValueError("metadata must be a JSON object")
    copied = dict(metadata)
    try:
        json.dumps(copied)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-serialisable: {exc}") from None
    return copied


def clean_token(token: object) -> str:
    """Return a bearer token with surrounding whitespace removed (a token read from a file ends in a newline).

    Raises:
        ValueError: not a string, blank, or holding whitespace or characters outside printable ASCII, which
            cannot travel in an `Authorization` header. The message never repeats the token.
    """
    if not isinstance(token, str):
        raise ValueError("auth_token must be a string")
    cleaned = token.strip()
    if not cleaned or not cleaned.isascii() or not cleaned.isprintable() or any(c.isspace() for c in cleaned):
        raise ValueError("auth_token must be a non-empty string of printable ASCII characters without spaces")
    return cleaned
