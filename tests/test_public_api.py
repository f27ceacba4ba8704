"""SPEC section 1: every public name importable from where it says, and `__all__` kept honest."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import promptise_asgi

SPEC_NAMES = {
    "promptise_asgi.runtime": [
        "AgentRuntime",
        "AgentProcess",
        "ProcessConfig",
        "TriggerConfig",
        "TriggerEvent",
        "ProcessState",
    ],
    "promptise_asgi.transport": ["create_transport_app", "RuntimeTransport"],
    "promptise_asgi.discovery": [
        "ProcessDiscovery",
        "DiscoveredNode",
        "NodeChange",
        "StaticDiscovery",
        "RegistryDiscovery",
        "CoordinatorDiscovery",
    ],
    "promptise_asgi.etcd": ["EtcdDiscovery"],
    "promptise_asgi.coordinator": ["RuntimeCoordinator", "NodeInfo", "create_coordinator_app"],
    "promptise_asgi.client": ["NodeClient", "NodeError", "NodeUnreachableError", "NodeTimeoutError"],
}
# Beyond section 1: SPEC 13/19 name `CoordinatorClient` in `promptise_asgi.client`, with errors naming the coordinator.
MORE_NAMES = {
    "promptise_asgi.client": [
        "CoordinatorClient",
        "CoordinatorError",
        "CoordinatorUnreachableError",
        "CoordinatorTimeoutError",
    ],
}


@pytest.mark.parametrize("module_name", sorted(SPEC_NAMES))
def test_spec_names_importable_from_their_module_and_the_package(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in SPEC_NAMES[module_name] + MORE_NAMES.get(module_name, []):
        assert name in module.__all__, f"{module_name}.__all__ lacks {name}"
        assert getattr(module, name) is getattr(promptise_asgi, name), name


@pytest.mark.parametrize("module_name", ["promptise_asgi", *sorted(SPEC_NAMES), "promptise_asgi.config"])
def test_all_is_sorted_and_every_name_exists(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name}"


def test_package_reexports_every_spec_name() -> None:
    every = {name for names in SPEC_NAMES.values() for name in names}
    assert every <= set(promptise_asgi.__all__)
    assert "app" in vars(promptise_asgi)


def test_timeout_is_a_kind_of_unreachable() -> None:
    assert issubclass(promptise_asgi.NodeTimeoutError, promptise_asgi.NodeUnreachableError)


def test_coordinator_errors_are_caught_by_the_node_error_handlers() -> None:
    # Code written against NodeError/NodeUnreachableError/NodeTimeoutError keeps catching them.
    assert issubclass(promptise_asgi.CoordinatorError, promptise_asgi.NodeError)
    assert issubclass(promptise_asgi.CoordinatorUnreachableError, promptise_asgi.NodeUnreachableError)
    assert issubclass(promptise_asgi.CoordinatorTimeoutError, promptise_asgi.NodeTimeoutError)
    assert issubclass(promptise_asgi.CoordinatorTimeoutError, promptise_asgi.CoordinatorUnreachableError)


def test_importing_the_package_or_the_command_line_loads_no_web_stack() -> None:
    """Names load on first use: the command line owns Ctrl-C 50 ms after it starts, not after 300 ms of imports."""
    code = (
        "import sys, promptise_asgi.cli, promptise_asgi; heavy = ('starlette.applications', 'httpx', 'uvicorn', "
        "'hypercorn', 'croniter', 'promptise_asgi.runtime'); print([m for m in heavy if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_lazy_names_are_the_real_ones_and_listed() -> None:
    assert set(promptise_asgi.__all__) <= set(dir(promptise_asgi))
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        promptise_asgi.nothing_here  # noqa: B018
