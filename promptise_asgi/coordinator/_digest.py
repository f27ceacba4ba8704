"""Heartbeat digests (SPEC 16): what a node says about itself when it heartbeats, checked before it is believed.

A digest is `{"process_count": N, "processes": [{"name", "state", "queue_size"}]}`; with a fresh one the
coordinator takes the node's health from its heartbeats instead of polling it. Knows nothing of HTTP (the app
caps the body's size) or of the coordinator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_MAX_DIGEST_BYTES", "Digest", "parse_digest"]

# As large as registration metadata may be: a node's digest costs the coordinator no more memory than that.
DEFAULT_MAX_DIGEST_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Digest:
    """A node's account of itself, from one heartbeat.

    Attributes:
        process_count: how many processes the node runs.
        processes: `[{"name", "state"}]`, with `"queue_size"` where the node gave it; None when the digest
            listed no processes (a count alone).
    """

    process_count: int
    processes: list[dict[str, Any]] | None = None


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return value


def parse_digest(body: Mapping[str, Any]) -> Digest | None:
    """Check a heartbeat's body; an empty one (`{}`) carries no digest.

    Keys other than `process_count` and `processes` are ignored, so a newer node can say more. Without
    `process_count`, the count is the number of processes listed.

    Returns:
        The digest, or None for an empty body.

    Raises:
        ValueError: naming the field that is wrong.
    """
    if not body:
        return None
    listed = body.get("processes")
    processes: list[dict[str, Any]] | None = None
    if listed is not None:
        if not isinstance(listed, list):
            raise ValueError("processes must be a list of {name, state, queue_size} objects")
        processes = []
        for entry in listed:
            if not isinstance(entry, dict):
                raise ValueError("processes must be a list of {name, state, queue_size} objects")
            name, state = entry.get("name"), entry.get("state")
            if not isinstance(name, str) or not name or not isinstance(state, str):
                raise ValueError("each process needs a non-empty text name and a text state")
            process: dict[str, Any] = {"name": name, "state": state}
            if entry.get("queue_size") is not None:
                process["queue_size"] = _count(entry["queue_size"], "queue_size")
            processes.append(process)
    count = body.get("process_count")
    if count is None:
        if processes is None:
            raise ValueError("a digest needs process_count or processes")
        return Digest(len(processes), processes)
    return Digest(_count(count, "process_count"), processes)
