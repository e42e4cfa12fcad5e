"""docs/protocol.md is enough to write a client: its complete example runs, as printed,
against the trivial model and against the shipped tiny μ0 (whose image_size is nil)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.runtime_helpers import REPO, spawn_server

DOC = REPO / "docs" / "protocol.md"


def _example_client() -> str:
    text = DOC.read_text()
    section = text[text.index("## A complete client") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize(
    ("model", "model_id"),
    [
        (("--trivial",), "echo"),
        (("--checkpoint", "checkpoints/tiny", "--threads", "1"), "mu0-tiny"),
    ],
)
def test_the_docs_example_client_works_against_the_server(tmp_path, model, model_id) -> None:
    script = tmp_path / "client.py"
    script.write_text(_example_client())
    proc, port = spawn_server(tmp_path, 0, model=model, start_timeout_s=120)
    try:
        out = subprocess.run(
            [sys.executable, str(script), f"tcp://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"{model_id} (4, 32, 3)"), out.stdout


def test_the_example_follows_the_docs_id_rule() -> None:
    code = _example_client()
    assert '"id": 1' not in code and "itertools.count(1)" in code
