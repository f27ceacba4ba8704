"""Node configuration: the TOML file, the environment, and the built-in demo.

Settings resolve as command-line flag, then environment (`PROMPTISE_NODE_ID`, `PROMPTISE_AUTH_TOKEN`,
`PROMPTISE_COORDINATOR_URL`, `PROMPTISE_ADVERTISE_URL`, `PROMPTISE_ALLOW_UNAUTHENTICATED`,
`PROMPTISE_TRUSTED_HOSTS`, `PROMPTISE_STORE`), then the file. Every problem is one `ConfigError`
whose message names the file, the process and the field. Builds runtimes; knows nothing of HTTP servers.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._validation import (
    check_seconds,
    clean_token,
    normalize_address_url,
    normalize_url,
    parse_endpoints,
    validate_node_id,
)
from .runtime import AgentRuntime, ProcessConfig, TriggerConfig, TriggerEvent
from .runtime._models import resolve_handler
from .store import EventStore, MemoryStore

__all__ = ["ConfigError", "NodeSettings", "ProcessSpec", "demo_settings", "load_settings", "resolve_settings"]

logger = logging.getLogger("promptise_asgi.config")

DEFAULT_CONFIG_NAME = "promptise.toml"

_NODE_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "host": str,
    "port": int,
    "auth_token": str,
    "read_token": str,
    "server": str,
    "coordinator_url": str,
    "advertise_url": str,
    "heartbeat_interval": (int, float),
    "etcd": (str, list),
    "max_body_bytes": int,
    "allow_unauthenticated": bool,
    "trusted_hosts": (str, list),
    "store": str,
}
_PROCESS_KEYS = {
    "name",
    "handler",
    "instructions",
    "model",
    "concurrency",
    "max_queue",
    "drain_timeout",
    "max_attempts",
    "retry_backoff",
    "poison_after",
    "max_dead_letters",
    "idempotency_ttl",
    "triggers",
}
# Where a node keeps its events when no store is given: relative to the working directory.
DEFAULT_STORE_DIR = "promptise-data"
_TRIGGER_KEYS = {"type", "cron_expression", "interval_seconds"}


@dataclass(slots=True)
class ProcessSpec:
    """One `[[processes]]` entry: a name and its `ProcessConfig`."""

    name: str
    config: ProcessConfig


@dataclass(slots=True)
class NodeSettings:
    """Everything needed to run one node.

    Attributes:
        node_id: the node's id.
        host: interface to bind (command line and file; default loopback).
        port: TCP port (default 9100).
        auth_token: bearer token (environment or file only, never a command-line flag).
        read_token: read-only bearer token: GET routes and streams only (environment or file only).
        server: "uvicorn" or "hypercorn" (None picks by event loop).
        coordinator_url: register with this coordinator while running.
        advertise_url: the URL other machines reach this node at.
        heartbeat_interval: seconds between registration heartbeats (None: the backend's default).
        etcd: etcd endpoints to register in (instead of a coordinator).
        max_body_bytes: the largest event body accepted.
        allow_unauthenticated: with no token, serve any peer (the loopback-only guard is off).
        trusted_hosts: `Host`/`Origin` names accepted besides loopback when there is no token.
        store: where accepted events are kept: a SQLite file, or `"memory"`; None means
            `./promptise-data/<node_id>.sqlite3`.
        processes: the processes to run.
        source: where this came from ("demo" or the file path), for messages.
    """

    node_id: str = "node-1"
    host: str = "127.0.0.1"
    port: int = 9100
    auth_token: str | None = None
    read_token: str | None = None
    server: str | None = None
    coordinator_url: str | None = None
    advertise_url: str | None = None
    heartbeat_interval: float | None = None
    etcd: list[str] = field(default_factory=list)
    max_body_bytes: int = 1024 * 1024
    allow_unauthenticated: bool = False
    trusted_hosts: list[str] = field(default_factory=list)
    store: str | None = None
    processes: list[ProcessSpec] = field(default_factory=list)
    source: str = "demo"

    def event_store(self) -> EventStore:
        """The store `store` names: a `MemoryStore` for `"memory"`, else a `SQLiteStore` on the file (by
        default `./promptise-data/<node_id>.sqlite3`; its directory is created when it opens)."""
        if self.store == "memory":
            return MemoryStore()
        from .store import SQLiteStore

        return SQLiteStore(self.store or Path(DEFAULT_STORE_DIR) / f"{self.node_id}.sqlite3")

    async def build_runtime(self) -> AgentRuntime:
        """Return a new (not started) runtime holding the configured processes, on `event_store()`.

        Raises:
            StoreLockedError: another live runtime uses the store file.
            EventStoreError: the store file cannot be opened.
        """
        runtime = AgentRuntime(store=self.event_store())
        for spec in self.processes:
            await runtime.add_process(spec.name, spec.config)
        return runtime


def load_settings(path: str | os.PathLike[str]) -> NodeSettings:
    """Read a node TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is wrong; the message names file, process
            and field.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read TOML: {exc}") from None
    return _parse(data, source)


def _parse(data: Mapping[str, Any], source: str) -> NodeSettings:
    unknown = set(data) - {"node", "processes"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected [node] and [[processes]]")
    node = data.get("node", {})
    if not isinstance(node, Mapping):
        raise ConfigError(f"{source}: [node] must be a table")
    settings = NodeSettings(source=source)
    for key, value in node.items():
        expected = _NODE_KEYS.get(key)
        if expected is None:
            raise ConfigError(f"{source}: [node]: unknown field {key!r}; known: {sorted(_NODE_KEYS)}")
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
            raise ConfigError(f"{source}: [node]: field {key!r} has the wrong type ({type(value).__name__})")
    try:
        _apply_node(settings, node)
    except ValueError as exc:
        raise ConfigError(f"{source}: [node]: {exc}") from None
    processes = data.get("processes", [])
    if not isinstance(processes, list):
        raise ConfigError(f"{source}: processes must be an array of tables ([[processes]])")
    seen: set[str] = set()
    for index, entry in enumerate(processes):
        spec = _parse_process(entry, f"{source}: processes[{index}]", source)
        if spec.name in seen:
            raise ConfigError(f"{source}: processes[{index}] ({spec.name!r}): field 'name': duplicate process name")
        seen.add(spec.name)
        settings.processes.append(spec)
    return settings


def _apply_node(settings: NodeSettings, node: Mapping[str, Any]) -> None:
    if "id" in node:
        settings.node_id = _checked_node_id(node["id"])
    for key in ("host", "server", "coordinator_url", "advertise_url", "auth_token", "read_token"):
        if key in node:
            setattr(settings, key, node[key])
    if "port" in node:
        settings.port = _checked_port(node["port"])
    if "heartbeat_interval" in node:
        settings.heartbeat_interval = check_seconds("field 'heartbeat_interval'", node["heartbeat_interval"])
    if "etcd" in node:
        settings.etcd = _split_endpoints(node["etcd"])
    if "max_body_bytes" in node:
        if node["max_body_bytes"] < 1:
            raise ValueError("field 'max_body_bytes' must be >= 1")
        settings.max_body_bytes = node["max_body_bytes"]
    if "allow_unauthenticated" in node:
        settings.allow_unauthenticated = node["allow_unauthenticated"]
    if "trusted_hosts" in node:
        settings.trusted_hosts = _split_names(node["trusted_hosts"])
    if "store" in node:
        settings.store = node["store"]
    _check_common(settings)


def _check_common(settings: NodeSettings) -> None:
    if settings.server not in (None, "uvicorn", "hypercorn"):
        raise ValueError(f"field 'server' must be 'uvicorn' or 'hypercorn', not {settings.server!r}")
    if settings.store is not None and not settings.store.strip():
        raise ValueError("field 'store' must be a file path or 'memory'")
    for key in ("coordinator_url", "advertise_url"):
        value = getattr(settings, key)
        if value is not None:
            try:
                setattr(settings, key, normalize_url(value))
            except ValueError:
                raise ValueError(f"field {key!r} must be an http(s) URL, not {value!r}") from None
    for key in ("auth_token", "read_token"):
        value = getattr(settings, key)
        if value is not None:
            try:
                setattr(settings, key, clean_token(value, key))
            except ValueError as exc:
                raise ValueError(f"field {key!r}: {exc}") from None
    if settings.read_token is not None and settings.auth_token is None:
        raise ValueError("field 'read_token' needs 'auth_token' (PROMPTISE_AUTH_TOKEN) as well")


def _checked_node_id(value: object) -> str:
    try:
        return validate_node_id(value)
    except ValueError as exc:
        raise ValueError(f"field 'id': {exc}") from None


def _checked_port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"field 'port' must be between 0 and 65535, not {value}")
    return value


def _split_endpoints(value: str | list[Any]) -> list[str]:
    if not value:
        return []  # no etcd: the node registers with a coordinator, or not at all
    try:
        return list(parse_endpoints(value))
    except ValueError as exc:
        raise ValueError(f"field 'etcd': {exc}") from None


def _split_names(value: str | list[Any]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    names = []
    for item in items:
        if not isinstance(item, str) or not item.strip() or any(c.isspace() for c in item.strip()):
            raise ValueError(f"field 'trusted_hosts' must list host names, not {item!r}")
        names.append(item.strip().lower())
    return names


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    value = env.get(name)
    if value is None:
        return None
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), not {value!r}")


def _parse_process(entry: object, where: str, source: str) -> ProcessSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a table")
    name = entry.get("name")
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}: field 'name': required, a non-empty string without '/'")
    where = f"{where} ({name!r})"
    unknown = set(entry) - _PROCESS_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_PROCESS_KEYS)}")
    options = {key: value for key, value in entry.items() if key not in ("name", "triggers")}
    triggers_data = entry.get("triggers", [])
    if not isinstance(triggers_data, list):
        raise ConfigError(f"{where}: field 'triggers' must be an array of tables ([[processes.triggers]])")
    triggers = []
    for index, trigger in enumerate(triggers_data):
        trigger_where = f"{where}: triggers[{index}]"
        if not isinstance(trigger, Mapping):
            raise ConfigError(f"{trigger_where}: must be a table")
        unknown = set(trigger) - _TRIGGER_KEYS
        if unknown:
            raise ConfigError(f"{trigger_where}: unknown field(s) {sorted(unknown)}; known: {sorted(_TRIGGER_KEYS)}")
        try:
            triggers.append(TriggerConfig(**trigger))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{trigger_where}: {_field_message(exc)}") from None
    try:
        config = ProcessConfig(**options, triggers=triggers)
        # Resolve "module:function" now so a typo fails at startup, naming the process, not at first start.
        _import_handler(config.handler, source)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {_field_message(exc)}") from None
    return ProcessSpec(name, config)


def _import_handler(handler: Any, source: str) -> None:
    """Resolve a handler; a "module:function" not importable as things stand is looked for in the working
    directory and then in the config file's directory (which stays on `sys.path` once it helped)."""
    try:
        resolve_handler(handler)
        return
    except ValueError as exc:
        missing = _missing_module(exc, handler)
        if missing is None:
            raise
    cwd = os.getcwd()
    config_dir = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else None
    for directory in dict.fromkeys(d for d in (cwd, config_dir) if d is not None):
        if directory in sys.path:
            continue
        sys.path.append(directory)
        importlib.invalidate_caches()
        try:
            resolve_handler(handler)
            return
        except ValueError as exc:
            if _missing_module(exc, handler) is None:
                raise
        sys.path.remove(directory)
    where = f"the working directory ({cwd})" + (f" or the config file's directory ({config_dir})" if config_dir else "")
    raise ValueError(
        f"handler {handler!r}: no module {missing!r} in {where}; run from the directory that holds it, or add "
        "that directory to PYTHONPATH"
    )


def _missing_module(exc: ValueError, handler: object) -> str | None:
    """The module a handler string names that could not be found, or None for any other import failure (a
    module that exists but fails, or lacks one of its own dependencies, must say so, not "not found")."""
    cause = exc.__cause__
    module = str(handler).partition(":")[0]
    if isinstance(cause, ModuleNotFoundError) and cause.name and (module + ".").startswith(cause.name + "."):
        return cause.name
    return None


def _field_message(exc: Exception) -> str:
    message = str(exc)
    for prefix in ("ProcessConfig.", "TriggerConfig."):
        if message.startswith(prefix):
            field_name, _, rest = message[len(prefix) :].partition(" ")
            return f"field {field_name!r} {rest}"
    if message.startswith("handler "):
        return f"field 'handler': {message}"
    return message


def resolve_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    demo_fallback: bool = True,
) -> NodeSettings:
    """Resolve a node's settings: flags (`overrides`), then environment, then the config file.

    The file is `config_path`, else `$PROMPTISE_CONFIG`, else `./promptise.toml` if present, else the
    built-in demo (when `demo_fallback`).

    Raises:
        ConfigError: a bad file, a bad environment value, or no file when `demo_fallback` is False.
    """
    env = os.environ if environ is None else environ
    path = config_path or env.get("PROMPTISE_CONFIG") or None
    if path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        path = DEFAULT_CONFIG_NAME
    if path is not None:
        settings = load_settings(path)
    elif demo_fallback:
        # A warning, not info: a server's default logging shows it, and serving the demo by accident matters.
        logger.warning("no PROMPTISE_CONFIG and no ./%s: serving the built-in demo runtime", DEFAULT_CONFIG_NAME)
        settings = demo_settings()
    else:
        raise ConfigError("no config file: pass --config FILE or set PROMPTISE_CONFIG")
    changes: dict[str, Any] = _from_environment(env)
    allow = _env_flag(env, "PROMPTISE_ALLOW_UNAUTHENTICATED")
    if allow is not None:
        changes["allow_unauthenticated"] = allow
    changes.update({key: value for key, value in (overrides or {}).items() if value is not None})
    if not changes:
        return settings
    settings = dataclasses.replace(settings, **changes)
    try:
        settings.node_id = _checked_node_id(settings.node_id)
        settings.port = _checked_port(settings.port)
        settings.etcd = _split_endpoints(settings.etcd)
        settings.trusted_hosts = _split_names(settings.trusted_hosts)
        _check_common(settings)
    except ValueError as exc:
        raise ConfigError(f"{settings.source} (with environment/flags): {exc}") from None
    return settings


# Setting -> (variable, how to read it, what it must be): a bad value is reported under the variable's name.
_ENVIRONMENT: dict[str, tuple[str, Any, str]] = {
    "node_id": ("PROMPTISE_NODE_ID", validate_node_id, "a node id: up to 128 letters, digits, '.', '_', ':' or '-'"),
    "coordinator_url": ("PROMPTISE_COORDINATOR_URL", normalize_address_url, "an http(s) URL or host:port"),
    "advertise_url": ("PROMPTISE_ADVERTISE_URL", normalize_address_url, "an http(s) URL or host:port"),
    "trusted_hosts": ("PROMPTISE_TRUSTED_HOSTS", _split_names, "comma-separated host names"),
    "store": ("PROMPTISE_STORE", str.strip, "a file path or 'memory'"),
}


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, (name, read, expected) in _ENVIRONMENT.items():
        if env.get(name):
            try:
                values[key] = read(env[name])
            except ValueError:
                raise ConfigError(f"{name} must be {expected}, not {env[name]!r}") from None
    for key, name in (("auth_token", "PROMPTISE_AUTH_TOKEN"), ("read_token", "PROMPTISE_READ_TOKEN")):
        if env.get(name):
            try:
                values[key] = clean_token(env[name], name)
            except ValueError:
                raise ConfigError(f"{name} must be printable ASCII without spaces (not shown)") from None
    return values


async def _echo(event: TriggerEvent) -> None:
    logger.info("demo echo: %s %s", event.trigger_type, event.payload)


def demo_settings() -> NodeSettings:
    """The built-in demo: a process woken every 5 seconds and one driven by injected events."""
    return NodeSettings(
        processes=[
            ProcessSpec(
                "heartbeat",
                ProcessConfig(
                    instructions="Demo: records an interval trigger every 5 seconds.",
                    triggers=[TriggerConfig(type="interval", interval_seconds=5.0)],
                ),
            ),
            ProcessSpec(
                "echo",
                ProcessConfig(
                    handler=_echo,
                    instructions="Demo: logs the payload of every event injected into it.",
                    triggers=[TriggerConfig(type="event")],
                ),
            ),
        ]
    )
