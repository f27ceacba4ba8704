"""Every ```python block in README.md runs as written, so the documentation cannot rot.

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
BLOCKS = re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_runnable_examples() -> None:
    assert len(BLOCKS) >= 8


ETCD_URL = "http://127.0.0.1:2379"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, request: pytest.FixtureRequest) -> None:
    code = BLOCKS[index]
    if re.search(r"^from promptise\.|^import promptise\b", code, flags=re.M):
        pytest.skip("needs the real promptise package: run by scripts/test-promptise")
    if ETCD_URL in code:
        # The README talks to an etcd on its default port; the test points the same code at its own etcd.
        code = code.replace(ETCD_URL, request.getfixturevalue("etcd").url)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{result.stderr}"
