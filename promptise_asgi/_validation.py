"""Boundary validation shared by discovery, the coordinator and its HTTP app.

Pure functions (and `NodeAddressRules`, whose one async method only resolves names): no knowledge of Starlette
or httpx.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import anyio

from ._errors import MetadataTooLargeError

__all__ = [
    "NODE_ID_PATTERN",
    "NodeAddressRules",
    "check_count",
    "check_idempotency_key",
    "check_seconds",
    "clean_token",
    "derive_idempotency_key",
    "exposed_without_token",
    "is_loopback_host",
    "metadata_size",
    "normalize_address_url",
    "normalize_tokens",
    "normalize_url",
    "parse_endpoints",
    "redact_url",
    "validate_metadata",
    "validate_node_id",
]

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NODE_ID_RE = re.compile(NODE_ID_PATTERN)


def validate_node_id(node_id: object) -> str:
    """Return `node_id` if it is a valid node id, else raise `ValueError` naming the rule."""
    if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError(f"node_id must match {NODE_ID_PATTERN}")
    return node_id


def normalize_url(url: object) -> str:
    """Return an http(s) URL with a host and a valid port, trailing slashes stripped, else raise `ValueError`."""
    return _http_url_parts(url).geturl().rstrip("/")


def _http_url_parts(url: object) -> SplitResult:
    """The parts of an http(s) URL with a host and a port in 1-65535 (explicit or the scheme's)."""
    if not isinstance(url, str):
        raise ValueError("url must be an http(s) URL")
    text = url.strip()
    shown = text if len(text) <= 200 else text[:200] + "..."
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be an http(s) URL with a host, got {shown!r}")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"url has an invalid port (1-65535): {shown!r}")
    return parts


def normalize_address_url(text: str) -> str:
    """`normalize_url`, reading a bare `host:port` as `http://host:port` (as curl and etcdctl do): for what a
    person types on a command line or in an environment variable."""
    text = text.strip()
    return normalize_url(text if "://" in text else f"http://{text}")


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


def clean_token(token: object, name: str = "auth_token") -> str:
    """Return a bearer token with surrounding whitespace removed (a token read from a file ends in a newline).

    Raises:
        ValueError: not a string, blank, or holding whitespace or characters outside printable ASCII, which
            cannot travel in an `Authorization` header. The message never repeats the token.
    """
    if not isinstance(token, str):
        raise ValueError(f"{name} must be a string")
    cleaned = token.strip()
    if not cleaned or not cleaned.isascii() or not cleaned.isprintable() or any(c.isspace() for c in cleaned):
        raise ValueError(f"{name} must be a non-empty string of printable ASCII characters without spaces")
    return cleaned


def check_seconds(name: str, value: object, *, zero_ok: bool = False) -> float:
    """Return a duration as a float: a finite number > 0 (>= 0 with `zero_ok`); a bool is not a number.

    Raises:
        ValueError: naming `name`, for anything else.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero_ok)
    ):
        raise ValueError(f"{name} must be a finite number of seconds {'>=' if zero_ok else '>'} 0, got {value!r}")
    return float(value)


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """Return `value` if it is an integer >= `minimum` (a bool is not), else raise ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


_IDEMPOTENCY_KEY_RE = re.compile(r"[\x20-\x7e]{1,255}")


def check_idempotency_key(key: object) -> str:
    """Return `key` if it is 1-255 characters in 0x20-0x7E (printable ASCII and space), else raise ValueError."""
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise ValueError("Idempotency-Key must be 1-255 characters of printable ASCII (0x20-0x7E)")
    return key


def derive_idempotency_key(key: str, node_id: str) -> str:
    """The key a broadcast sends to one node: the same for the same key and node, different per node.

    A retried broadcast (same key) is recognised by every node, and one node never mistakes another node's
    event for its own. 64 hex characters: a valid key whatever the inputs were.
    """
    return hashlib.sha256(f"{key}\0{node_id}".encode()).hexdigest()


def metadata_size(metadata: Mapping[str, Any], limit: int) -> int:
    """Return the size of `metadata` serialized as compact JSON.

    Raises:
        MetadataTooLargeError: it is larger than `limit` bytes.
    """
    size = len(json.dumps(metadata, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limit:
        raise MetadataTooLargeError(limit)
    return size


# Never called, whatever a registration says: link-local space holds the cloud metadata services (AWS, GCP and
# Azure answer credentials at 169.254.169.254; AWS also at fd00:ec2::254), and a wildcard address means "this
# machine" to a connecting socket.
_FORBIDDEN_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128", "0.0.0.0/32", "::/128")
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NodeAddressRules:
    """Which node URLs a coordinator agrees to call (SPEC 18).

    `http`/`https` with a host and a valid port, no user info, query or fragment; never a link-local or cloud
    metadata address; and, when `networks` is given, only addresses inside those networks.

    Args:
        networks: CIDR strings (`"10.0.0.0/8"`, `"fd00::/8"`); empty allows every address but the forbidden ones.

    Raises:
        ValueError: a network is not a valid CIDR.
    """

    def __init__(self, networks: Iterable[str] = ()) -> None:
        parsed: list[IPNetwork] = []
        for network in networks:
            try:
                parsed.append(ipaddress.ip_network(str(network).strip(), strict=False))
            except ValueError:
                raise ValueError(f"node network {network!r} is not a CIDR like 10.0.0.0/8") from None
        self.networks = tuple(parsed)

    def check_url(self, url: object) -> str:
        """Return the node URL normalised (trailing slashes stripped), or raise ValueError naming the problem.

        A literal IP address is checked here; a host name is checked by `check_resolved`.
        """
        parts = _node_url_parts(url)
        address = _literal_address(parts.hostname or "")
        if address is not None:
            self.check_address(address)
        return parts.geturl().rstrip("/")

    def check_address(self, address: IPAddress) -> None:
        """Raise ValueError when the coordinator must not call `address`."""
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        address = mapped or address
        if any(address in network for network in _FORBIDDEN_NETWORKS):
            raise ValueError(f"url host {address} is a link-local, metadata or wildcard address, which is never called")
        if self.networks and not any(address in network for network in self.networks):
            allowed = ", ".join(str(n) for n in self.networks)
            raise ValueError(f"url host {address} is outside the allowed node networks ({allowed})")

    async def check_resolved(self, url: str) -> None:
        """Resolve a host name and check every address it has (a literal address needs nothing more).

        Raises:
            ValueError: the name does not resolve, or one of its addresses is refused.
        """
        host = urlsplit(url).hostname or ""
        if _literal_address(host) is not None:
            return
        try:
            infos = await anyio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"url host {host!r} does not resolve: {exc.strerror or exc}") from None
        for info in infos:
            self.check_address(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))


def _node_url_parts(url: object) -> SplitResult:
    parts = _http_url_parts(url)
    if "@" in parts.netloc:
        raise ValueError("url must not contain user info (user:password@)")
    if parts.query or parts.fragment or "?" in parts.geturl() or "#" in parts.geturl():
        raise ValueError("url must not have a query or a fragment")
    return parts


def _literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def redact_url(url: str) -> str:
    """`url` with the password of its user info hidden (`user:***@host`), for messages and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}"))


def parse_endpoints(endpoints: str | Sequence[str], what: str = "etcd endpoint") -> tuple[str, ...]:
    """Normalise a comma-separated string or a sequence of server URLs; a bare `host:port` means http.

    Raises:
        ValueError: naming `what` and the bad item (its password hidden), or when there is none.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    parsed: list[str] = []
    for item in items:
        if isinstance(endpoints, str) and isinstance(item, str) and not item.strip():
            continue  # "a,b," is a list of two
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{what} must be a non-empty URL, got {item!r}")
        try:
            # etcdctl accepts a bare host:port, so a user coming from it will type that.
            parsed.append(normalize_address_url(item))
        except ValueError:
            raise ValueError(f"{what} must be an http(s) URL, got {redact_url(item.strip())!r}") from None
    if not parsed:
        raise ValueError(f"at least one {what} is required")
    return tuple(parsed)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})


def is_loopback_host(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8 and ::1 (with or without brackets), and IPv4-mapped loopback."""
    host = host.strip().lower().strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def normalize_tokens(auth_token: str | Sequence[str] | None, name: str = "auth_token") -> tuple[bytes, ...]:
    """Validate a token setting (one string, several for rotation, or None) and return the tokens as bytes.

    Surrounding whitespace is removed (a token read from a file or an environment variable often ends in a
    newline; the presented credential is stripped too, so the two must match).

    Raises:
        ValueError: naming `name`: a token is blank or not printable ASCII, or the sequence is empty.
    """
    if auth_token is None:
        return ()
    tokens = [auth_token] if isinstance(auth_token, str) else list(auth_token)
    if not tokens:
        raise ValueError(f"{name} must be a non-empty string, a non-empty list of them, or None")
    return tuple(clean_token(t, name).encode() for t in tokens)


def exposed_without_token(host: str, *, has_token: bool, allow_unauthenticated: bool) -> bool:
    """The rule behind every refusal to bind: a non-loopback address without a token, unless the user opted out."""
    return not has_token and not allow_unauthenticated and not is_loopback_host(host)
