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
