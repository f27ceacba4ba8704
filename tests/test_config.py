"""Node configuration: the TOML schema, the environment, precedence and error messages (SPEC 6, 9)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from promptise_asgi.config import ConfigError, demo_settings, load_settings, resolve_settings

EXAMPLE = Path(__file__).parent.parent / "examples" / "promptise.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_example_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE.parent.parent))
    settings = load_settings(EXAMPLE)
    assert settings.node_id == "node-1"
    assert [p.name for p in settings.processes] == ["watcher", "echo"]
    watcher = settings.processes[0].config
    assert watcher.instructions == "Monitor data."
    assert watcher.triggers[0].cron_expression == "*/5 * * * *"
    assert settings.processes[1].config.triggers[0].interval_seconds == 30.0


async def test_settings_build_a_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # its events go to ./promptise-data/n2.sqlite3, the default store
    path = write(
        tmp_path,
        """
[node]
id = "n2"
[[processes]]
name = "a"
max_queue = 7
[[processes]]
name = "b"
""",
    )
    runtime = await load_settings(path).build_runtime()
    assert list(runtime.processes) == ["a", "b"]
    assert runtime.get_process("a").status()["max_queue"] == 7
    await runtime.aclose()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[node]\nid = '-bad'", ["[node]", "id"]),
        ("[node]\nport = 'x'", ["[node]", "'port'", "wrong type"]),
        ("[node]\nport = 70000", ["'port'", "65535"]),
        ("[node]\nbogus = 1", ["[node]", "unknown field 'bogus'"]),
        ("[node]\ncoordinator_url = 'ftp://x'", ["coordinator_url", "http(s)"]),
        ("[node]\nserver = 'gunicorn'", ["server"]),
        ("[node]\nauth_token = '  '", ["auth_token"]),
        ("[[processes]]\ninstructions = 'no name'", ["processes[0]", "'name'"]),
        ("[[processes]]\nname = 'a/b'", ["processes[0]", "'name'"]),
        ("[[processes]]\nname = 'w'\nmax_queue = 0", ["processes[0] ('w')", "'max_queue'", ">= 1"]),
        ("[[processes]]\nname = 'w'\nconcurrency = 'two'", ["('w')", "'concurrency'"]),
        ("[[processes]]\nname = 'w'\nhandler = 'nosuchmodule_abc:fn'", ["('w')", "'handler'", "nosuchmodule_abc"]),
        ("[[processes]]\nname = 'w'\nhandler = 'no-colon'", ["('w')", "'handler'"]),
        ("[[processes]]\nname = 'w'\nmodle = 'typo'", ["('w')", "unknown field", "modle"]),
        (
            "[[processes]]\nname = 'w'\n[[processes.triggers]]\ntype = 'cron'\ncron_expression = 'nope'",
            ["('w')", "triggers[0]", "cron_expression"],
        ),
        (
            "[[processes]]\nname = 'w'\n[[processes.triggers]]\ntype = 'interval'\ninterval_seconds = -1",
            ["triggers[0]", "interval_seconds"],
        ),
        ("[[processes]]\nname = 'w'\n[[processes.triggers]]\ntype = 'sometimes'", ["triggers[0]", "'type'"]),
        ("[[processes]]\nname = 'w'\n[[processes]]\nname = 'w'", ["processes[1] ('w')", "duplicate"]),
        ("processes = 3", ["processes"]),
        ("[other]\nx = 1", ["unknown top-level"]),
        ("not toml at all [", ["cannot read TOML"]),
    ],
)
def test_bad_config_names_file_process_and_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_precedence_flag_then_environment_then_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nid = 'from-file'\nauth_token = 'file-token'\n")
    file_only = resolve_settings(path, environ={})
    assert (file_only.node_id, file_only.auth_token) == ("from-file", "file-token")
    env = {"PROMPTISE_NODE_ID": "from-env", "PROMPTISE_AUTH_TOKEN": "env-token"}
    from_env = resolve_settings(path, environ=env)
    assert (from_env.node_id, from_env.auth_token) == ("from-env", "env-token")
    from_flag = resolve_settings(path, environ=env, overrides={"node_id": "from-flag", "port": None})
    assert (from_flag.node_id, from_flag.auth_token) == ("from-flag", "env-token")


def test_config_from_environment_variable_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[node]\nid = 'env-file'\n")
    assert resolve_settings(environ={"PROMPTISE_CONFIG": str(path)}).node_id == "env-file"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "promptise.toml").write_text("[node]\nid = 'cwd-file'\n")
    assert resolve_settings(environ={}).node_id == "cwd-file"


def test_demo_fallback_and_its_absence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = resolve_settings(environ={})
    assert settings.source == "demo"
    assert [p.name for p in settings.processes] == [p.name for p in demo_settings().processes]
    with pytest.raises(ConfigError, match="--config"):
        resolve_settings(environ={}, demo_fallback=False)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PROMPTISE_NODE_ID", "bad id", "PROMPTISE_NODE_ID must be a node id: up to 128 letters, digits"),
        ("PROMPTISE_COORDINATOR_URL", "ftp://x", "PROMPTISE_COORDINATOR_URL must be an http(s) URL or host:port"),
        ("PROMPTISE_ADVERTISE_URL", "http://h:0", "PROMPTISE_ADVERTISE_URL must be an http(s) URL or host:port"),
        ("PROMPTISE_TRUSTED_HOSTS", "a b", "PROMPTISE_TRUSTED_HOSTS must be comma-separated host names"),
        ("PROMPTISE_AUTH_TOKEN", "two words", "PROMPTISE_AUTH_TOKEN must be printable ASCII without spaces"),
    ],
)
def test_bad_environment_values_name_the_variable(
    name: str, value: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_settings(environ={name: value})
    assert str(info.value).startswith(message)
    assert "field" not in str(info.value)  # the file's field names mean nothing to whoever set the variable
    if name == "PROMPTISE_AUTH_TOKEN":
        assert value not in str(info.value)


def test_a_bare_host_and_port_in_the_environment_means_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = resolve_settings(environ={"PROMPTISE_COORDINATOR_URL": "10.0.0.2:9000"}, demo_fallback=True)
    assert settings.coordinator_url == "http://10.0.0.2:9000"


HANDLER = "async def handle(event):\n    pass\n"


def test_a_handler_is_found_next_to_its_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from anywhere: a handler module beside the config file is found there, after the working directory."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "beside_config_abc.py").write_text(HANDLER)
    path = tmp_path / "conf" / "node.toml"
    path.write_text("[[processes]]\nname = 'w'\nhandler = 'beside_config_abc:handle'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))
    settings = load_settings(path)
    assert settings.processes[0].config.handler == "beside_config_abc:handle"
    assert str(tmp_path / "conf") in sys.path  # kept: the handler's module may import its neighbours later


def test_a_handler_in_the_working_directory_is_found_even_off_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a console script sys.path holds the script's directory, not the working directory.
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "in_cwd_abc.py").write_text(HANDLER)
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "node.toml"
    path.write_text("[[processes]]\nname = 'w'\nhandler = 'in_cwd_abc:handle'\n")
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    assert load_settings(path).processes[0].config.handler == "in_cwd_abc:handle"
    assert str(tmp_path / "work") in sys.path and str(tmp_path / "conf") not in sys.path


def test_a_missing_handler_module_names_both_directories_and_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "node.toml"
    path.write_text("[[processes]]\nname = 'w'\nhandler = 'nowhere_abc.sub:handle'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = list(sys.path)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: processes[0] ('w'): field 'handler': handler 'nowhere_abc.sub:handle': ")
    assert f"no module 'nowhere_abc' in the working directory ({tmp_path})" in message
    assert f"or the config file's directory ({tmp_path / 'conf'})" in message and "PYTHONPATH" in message
    assert sys.path == before  # directories that did not help are not left behind


def test_a_handler_module_that_fails_to_import_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its own missing dependency is not "handler not found": the real cause is shown.
    (tmp_path / "broken_abc.py").write_text("import no_such_dependency_abc\n" + HANDLER)
    path = write(tmp_path, "[[processes]]\nname = 'w'\nhandler = 'broken_abc:handle'\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ConfigError, match="No module named 'no_such_dependency_abc'") as info:
        load_settings(path)
    assert "PYTHONPATH" not in str(info.value)


def test_node_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[node]
host = "0.0.0.0"
port = 0
server = "hypercorn"
coordinator_url = "http://127.0.0.1:9000/"
advertise_url = "http://10.1.2.3:9100"
heartbeat_interval = 2
etcd = "http://127.0.0.1:2379,http://127.0.0.1:22379/"
max_body_bytes = 2048
""",
    )
    settings = load_settings(path)
    assert settings.host == "0.0.0.0" and settings.port == 0 and settings.server == "hypercorn"
    assert settings.coordinator_url == "http://127.0.0.1:9000"
    assert settings.heartbeat_interval == 2.0
    assert settings.etcd == ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
    assert settings.max_body_bytes == 2048


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[node]\nheartbeat_interval = 0", "heartbeat_interval"),
        ("[node]\nmax_body_bytes = 0", "max_body_bytes"),
        ("[node]\netcd = ['ftp://x']", "etcd"),
        ("[node]\nadvertise_url = 'x'", "advertise_url"),
        ("node = 1", "[node] must be a table"),
        ("[[processes]]\nname = 'w'\ntriggers = 1", "triggers"),
        ("processes = [1]", "must be a table"),
        ("[[processes]]\nname = 'w'\ntriggers = [1]", "must be a table"),
    ],
)
def test_more_bad_values(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_settings(write(tmp_path, text))


def test_etcd_flag_overrides_and_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\netcd = ['http://127.0.0.1:2379']\n")
    settings = resolve_settings(path, environ={}, overrides={"etcd": ["http://10.0.0.1:2379/", "http://10.0.0.2:2379"]})
    assert settings.etcd == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    with pytest.raises(ConfigError, match="etcd"):
        resolve_settings(path, environ={}, overrides={"etcd": ["ftp://10.0.0.1:2379"]})


def test_token_from_the_environment_loses_its_newline(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nid = 'n'\n")
    assert resolve_settings(path, environ={"PROMPTISE_AUTH_TOKEN": "tok\n"}).auth_token == "tok"


def test_read_token_from_the_environment_or_the_file_needs_an_auth_token(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nauth_token = 'control'\nread_token = 'look'\n")
    assert resolve_settings(path, environ={}).read_token == "look"
    env = {"PROMPTISE_AUTH_TOKEN": "control", "PROMPTISE_READ_TOKEN": "viewer\n"}
    assert resolve_settings(write(tmp_path, "[node]\n"), environ=env).read_token == "viewer"
    with pytest.raises(ConfigError, match="'read_token' needs 'auth_token'"):
        resolve_settings(write(tmp_path, "[node]\nread_token = 'look'\n"), environ={})


class TestStoreSetting:
    """SPEC 12: `[node] store`, `PROMPTISE_STORE` and `--store`: a SQLite file by default, or memory."""

    async def test_the_default_is_a_sqlite_file_named_for_the_node_in_the_working_directory(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.chdir(tmp_path)
        settings = resolve_settings(write(tmp_path, "[node]\nid = 'n7'\n[[processes]]\nname = 'a'\n"), environ={})
        assert settings.store is None
        runtime = await settings.build_runtime()
        assert runtime.store.kind == "sqlite"
        assert runtime.store.location == str(tmp_path / "promptise-data" / "n7.sqlite3")
        assert (tmp_path / "promptise-data" / "n7.sqlite3").is_file()
        await runtime.aclose()

    async def test_file_environment_and_flag(self, tmp_path: Path) -> None:
        path = write(tmp_path, f"[node]\nstore = '{tmp_path / 'file.sqlite3'}'\n")
        assert load_settings(path).store == str(tmp_path / "file.sqlite3")
        assert resolve_settings(path, environ={"PROMPTISE_STORE": "memory"}).store == "memory"
        flagged = resolve_settings(path, environ={"PROMPTISE_STORE": "memory"}, overrides={"store": "x.sqlite3"})
        assert flagged.store == "x.sqlite3"
        memory = await resolve_settings(path, environ={"PROMPTISE_STORE": "memory"}).build_runtime()
        assert memory.store.kind == "memory"
        assert load_settings(path).event_store().location == str(tmp_path / "file.sqlite3")

    @pytest.mark.parametrize("value", ["''", "'  '", "3"])
    def test_a_bad_store_names_the_field(self, tmp_path: Path, value: str) -> None:
        with pytest.raises(ConfigError, match="'store'"):
            load_settings(write(tmp_path, f"[node]\nstore = {value}\n"))

    def test_process_keys_for_retries_dead_letters_and_keys(self, tmp_path: Path) -> None:
        text = (
            "[[processes]]\nname = 'a'\nmax_attempts = 4\nretry_backoff = 0.1\npoison_after = 2\n"
            "max_dead_letters = 50\nidempotency_ttl = 60.0\n"
        )
        config = load_settings(write(tmp_path, text)).processes[0].config
        assert (config.max_attempts, config.retry_backoff, config.poison_after) == (4, 0.1, 2)
        assert (config.max_dead_letters, config.idempotency_ttl) == (50, 60.0)
        with pytest.raises(ConfigError, match="'max_attempts'"):
            load_settings(write(tmp_path, "[[processes]]\nname = 'a'\nmax_attempts = 0\n"))
