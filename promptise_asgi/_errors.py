"""The package's exception hierarchy, in one place.

Public classes are re-exported from the module a user meets them in (`client` for the node errors,
`runtime` for queue and lifecycle errors). HTTP mapping of these lives in the transport, not here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

__all__ = [
    "ClusterFullError",
    "ConfigError",
    "CoordinatorError",
    "CoordinatorTimeoutError",
    "CoordinatorUnreachableError",
    "DiscoveryUnavailableError",
    "EtcdError",
    "EtcdUnavailableError",
    "EventStoreError",
    "IdempotencyKeyConflictError",
    "MetadataTooLargeError",
    "NodeConflictError",
    "NodeError",
    "NodeResponseTooLargeError",
    "NodeTimeoutError",
    "NodeUnreachableError",
    "PromptiseASGIError",
    "QueueFullError",
    "StoreLockedError",
    "answer_error_text",
]


class PromptiseASGIError(Exception):
    """Base class of every error this package raises on purpose."""


class QueueFullError(PromptiseASGIError):
    """An event was refused because the process queue is at `max_queue`.

    Attributes:
        process: the process name.
        max_queue: the queue bound that was hit.
        retry_after: seconds a caller should wait before trying again.
    """

    def __init__(self, process: str, max_queue: int, retry_after: float = 1.0) -> None:
        super().__init__(f"Process '{process}' queue is full ({max_queue} events)")
        self.process = process
        self.max_queue = max_queue
        self.retry_after = retry_after


class EventStoreError(PromptiseASGIError):
    """The event store could not do what was asked (open its file, commit a write); the message says why."""


class StoreLockedError(EventStoreError):
    """Another live runtime holds the store file: one writer per file.

    Attributes:
        path: the store file.
    """

    def __init__(self, path: str, holder: str = "") -> None:
        super().__init__(
            f"event store {path} is in use by another live runtime{f' ({holder})' if holder else ''}: "
            "give each node (and each server worker) its own store file"
        )
        self.path = path


class IdempotencyKeyConflictError(PromptiseASGIError):
    """An idempotency key this process already accepted came again with a different event.

    Attributes:
        process: the process name.
        key: the idempotency key.
        event_id: the id of the event first accepted with that key.
    """

    def __init__(self, process: str, key: str, event_id: str) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used on process '{process}' with a different body (event {event_id})"
        )
        self.process = process
        self.key = key
        self.event_id = event_id


class ConfigError(PromptiseASGIError, ValueError):
    """A node configuration (TOML file or environment) is invalid; the message names file, process and field."""


class NodeError(PromptiseASGIError):
    """A node answered with a non-2xx status.

    Attributes:
        status_code: the HTTP status the node answered with.
        message: the node's `{"error": ...}` text (or the raw body when it was not JSON).
        url: the URL that was requested.
    """

    def __init__(self, status_code: int, message: str, url: str = "") -> None:
        super().__init__(f"{status_code} {message}" + (f" ({url})" if url else ""))
        self.status_code = status_code
        self.message = message
        self.url = url


class NodeUnreachableError(PromptiseASGIError):
    """The node could not be reached (connection refused, reset, DNS, TLS...).

    Attributes:
        url: the URL that was requested.
    """

    def __init__(self, url: str, reason: str = "") -> None:
        super().__init__(f"node unreachable at {url}" + (f" ({reason})" if reason else ""))
        self.url = url
        self.reason = reason


class NodeTimeoutError(NodeUnreachableError):
    """The node did not answer within the timeout."""

    def __init__(self, url: str, reason: str = "") -> None:
        PromptiseASGIError.__init__(self, f"node timed out at {url}" + (f" ({reason})" if reason else ""))
        self.url = url
        self.reason = reason


class NodeResponseTooLargeError(NodeUnreachableError):
    """The node's answer was larger than the client's `max_response_bytes`; the rest was not read.

    A subclass of `NodeUnreachableError`: no usable answer came back (a coordinator answers 502).

    Attributes:
        limit: the byte limit that was passed.
    """

    def __init__(self, url: str, limit: int) -> None:
        PromptiseASGIError.__init__(self, f"response too large: the node at {url} answered more than {limit} bytes")
        self.url = url
        self.reason = f"response too large (over {limit} bytes)"
        self.limit = limit


class CoordinatorError(NodeError):
    """A coordinator answered with a non-2xx status.

    A `NodeError` (code that catches those keeps working) whose message names the coordinator, not a node.

    Attributes:
        status_code: the HTTP status the coordinator answered with.
        message: the coordinator's `{"error": ...}` text (or the raw body when it was not JSON).
        url: the URL that was requested.
        coordinator: the coordinator's base URL.
    """

    def __init__(self, status_code: int, message: str, url: str = "", coordinator: str = "") -> None:
        PromptiseASGIError.__init__(
            self, f"coordinator at {coordinator or url or '?'} answered {status_code}: {message}"
        )
        self.status_code = status_code
        self.message = message
        self.url = url
        self.coordinator = coordinator or url


class CoordinatorUnreachableError(NodeUnreachableError):
    """A coordinator could not be reached (connection refused, reset, DNS, TLS...).

    Attributes:
        url: the URL that was requested.
        coordinator: the coordinator's base URL.
    """

    _what = "coordinator unreachable"

    def __init__(self, coordinator: str, reason: str = "", url: str = "") -> None:
        PromptiseASGIError.__init__(self, f"{self._what} at {coordinator}" + (f" ({reason})" if reason else ""))
        self.url = url or coordinator
        self.reason = reason
        self.coordinator = coordinator


class CoordinatorTimeoutError(CoordinatorUnreachableError, NodeTimeoutError):
    """A coordinator did not answer within the timeout."""

    _what = "coordinator did not answer in time"


class NodeConflictError(PromptiseASGIError):
    """A registration would displace a node that is registered, and alive, at another URL.

    Attributes:
        node_id: the node id asked for.
    """

    def __init__(self, node_id: str) -> None:
        super().__init__(f"Node '{node_id}' is registered at another URL")
        self.node_id = node_id


class MetadataTooLargeError(PromptiseASGIError, ValueError):
    """A node's registration metadata is larger, serialized as JSON, than the coordinator accepts.

    Attributes:
        limit: the byte limit.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"metadata larger than {limit} bytes (serialized as JSON)")
        self.limit = limit


class ClusterFullError(PromptiseASGIError):
    """The coordinator already holds `max_nodes` nodes and refuses a new one.

    Attributes:
        max_nodes: the cap.
    """

    def __init__(self, max_nodes: int) -> None:
        super().__init__(f"cluster full: the coordinator holds its maximum of {max_nodes} nodes")
        self.max_nodes = max_nodes


class DiscoveryUnavailableError(PromptiseASGIError):
    """The discovery backend failed or did not answer in time; nothing was changed there.

    Attributes:
        reason: what the backend did.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"discovery unavailable: {reason}")
        self.reason = reason


class EtcdError(PromptiseASGIError):
    """etcd answered a request with an error.

    Attributes:
        status_code: the HTTP status of the gateway's answer (0 when the answer was unreadable).
        message: etcd's error text.
        endpoint: the endpoint that answered (credentials removed).
    """

    def __init__(self, status_code: int, message: str, endpoint: str = "") -> None:
        super().__init__(f"etcd error {status_code}: {message}" + (f" ({endpoint})" if endpoint else ""))
        self.status_code = status_code
        self.message = message
        self.endpoint = endpoint


class EtcdUnavailableError(EtcdError):
    """No etcd endpoint could be reached (refused, reset, timed out or unavailable).

    Attributes:
        endpoints: every endpoint that was tried (credentials removed).
        reason: what each endpoint did.
    """

    def __init__(self, endpoints: Sequence[str], reason: str = "") -> None:
        PromptiseASGIError.__init__(
            self, f"etcd unavailable at {', '.join(endpoints)}" + (f" ({reason})" if reason else "")
        )
        self.status_code = 0
        self.message = reason
        self.endpoint = ""
        self.endpoints = tuple(endpoints)
        self.reason = reason


# An error page can be large (an HTML 502 from a proxy); keep exception messages readable.
_MAX_MESSAGE_CHARS = 500


def answer_error_text(content: bytes, status_code: int) -> str:
    """The message of a failed answer from a node, a coordinator or etcd, for an exception.

    The JSON `{"error": "..."}` text (etcd's `{"error": {"message": ...}}` too), else the start of the body,
    else `HTTP <status>`; at most 500 characters.
    """
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message", error)
    message = str(error) if error is not None else content.decode("utf-8", "replace").strip()
    message = message or f"HTTP {status_code}"
    return message if len(message) <= _MAX_MESSAGE_CHARS else message[:_MAX_MESSAGE_CHARS] + "..."
