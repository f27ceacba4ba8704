"""Every ```python block in README.md and the docs runs as written, so the documentation cannot rot.

Blocks that need the real `promptise` package are run by the promptise-marked tests instead
(tests/test_promptise_compat.py), in the environment that has it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from promptise_asgi import _cli_parser, cli

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    (f"{page.relative_to(ROOT)}#{index}", code)
    for page in PAGES
    for index, code in enumerate(re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.S | re.M))
]


def test_the_docs_have_runnable_examples() -> None:
    assert len(BLOCKS) >= 10
    assert any(name.startswith("README.md") for name, _ in BLOCKS)


ETCD_URL = "http://127.0.0.1:2379"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "code"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_python_block_runs(name: str, code: str, request: pytest.FixtureRequest) -> None:
    if re.search(r"^from promptise\.|^import promptise\b", code, flags=re.M):
        pytest.skip("needs the real promptise package: run by scripts/test-promptise")
    if ETCD_URL in code:
        # The docs talk to an etcd on its default port; the test points the same code at its own etcd.
        code = code.replace(ETCD_URL, request.getfixturevalue("etcd").url)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{name} failed:\n{code}\n--- stderr ---\n{result.stderr}"


# -- the CLI reference and --help agree --------------------------------------------------------------------

CLI_PAGE = ROOT / "docs" / "cli.md"
FLAG = r"(?<![\w-])--[a-z][a-z-]*"


def cli_help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*args, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def page_sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", CLI_PAGE.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def mentions(text: str, name: str) -> bool:
    return re.search(rf"{re.escape(name)}(?![\w-])", text) is not None


def test_the_cli_reference_documents_every_command_flag_and_variable_help_names(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # one help line per option: no name is ever wrapped
    sections = page_sections()
    top = cli_help([], capsys)
    commands = re.findall(r"^ {4}(\w+) {2,}", top, flags=re.M)
    assert commands == ["node", "coordinator", "status", "demo"]
    for flag in re.findall(FLAG, top):
        assert mentions(sections["Global options"], flag), f"{flag} is not in the page's Global options"
    for command in commands:
        section = sections.get(f"`promptise-asgi {command}`")
        assert section is not None, f"docs/cli.md has no section for {command}"
        text = cli_help([command], capsys)
        assert "--log-level" in text  # a global option, documented once, accepted after the command too
        for flag in set(re.findall(FLAG, text)) - {"--help", "--log-level"}:
            assert mentions(section, flag), f"{command} {flag} is not documented in docs/cli.md"
        for variable in set(re.findall(r"PROMPTISE_[A-Z_]+", text)):
            assert mentions(section, variable), f"{command} reads {variable}, which docs/cli.md does not say"
        # And the other way: every flag a table of the page lists exists.
        for flag in re.findall(rf"^\| `({FLAG})", section, flags=re.M):
            assert mentions(text, flag), f"docs/cli.md lists {command} {flag}, which --help does not know"


def test_the_cli_reference_lists_the_exit_statuses() -> None:
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", page_sections()["Exit status"], flags=re.M)}
    assert documented == {0, cli.EXIT_FAILURE, _cli_parser.EXIT_USAGE, cli.EXIT_INTERRUPTED}


def test_the_figures_in_the_readme_and_the_performance_page_come_from_the_benchmark() -> None:
    """No figure is copied by hand: the README's block is the summary a full `scripts/bench` run wrote, and the
    performance page includes the run's table and curve files."""
    readme = (ROOT / "README.md").read_text()
    start = "<!-- latest figures: written by scripts/bench from a full run -->\n"
    block = readme[readme.index(start) + len(start) : readme.index("<!-- end of latest figures -->")]
    assert block == (ROOT / "bench" / "results" / "summary.md").read_text()
    assert "| GET /health req/s |" in block
    performance = (ROOT / "docs" / "performance.md").read_text()
    for written in ("latest.md", "curve.md"):
        assert f'--8<-- "bench/results/{written}"' in performance
        assert (ROOT / "bench" / "results" / written).stat().st_size > 0


def test_the_benchmark_writes_the_readme_summary_and_the_curve_from_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import __main__ as bench

    scale = [
        ["coordinator CPU, 1,000 nodes heartbeating every 10 s", "9% of a core", "-", "2%", "-", "-", "-"],
        ["full cluster status, 1,000 nodes", "3 ms", "-", "254 ms", "-", "< 100 ms", "yes"],
        ["full cluster status, 10,000 nodes", "75 ms", "-", "2,701 ms", "-", "< 100 ms", "yes"],
        ["node RSS, 1,000 distinct 48 KB Hosts + 1 MiB headers", "+0.4 MB | flat", "-", "-", "-", "flat", "yes"],
    ]
    monkeypatch.setattr(bench, "table_sections", lambda _: [("other benchmark scripts", scale)])
    summary = bench.summary_markdown({})
    curve = bench.curve_markdown({})
    assert summary.splitlines()[2:] == [
        "| full cluster status, 10,000 nodes | 75 ms | - | < 100 ms | yes |",
        "| node RSS, 1,000 distinct 48 KB Hosts + 1 MiB headers | +0.4 MB \\| flat | - | flat | yes |",
    ]
    lines = curve.splitlines()
    assert lines[2].startswith("| 1,000 | 9% of a core | - | 3 ms | - | 254 ms")
    assert lines[3] == "| 10,000 | - | - | 75 ms | - | 2,701 ms |"
