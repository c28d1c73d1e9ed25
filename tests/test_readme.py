"""Every ```python block of README.md runs, in order, as a new user would run it after the demo.

The demo's export (``runs/pretrain/hf``) is stood in for by a tiny transformers model with the
byte vocabulary and jt5's tokenizer files, in a temporary working directory.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 3  # API, bridge, generation


@pytest.fixture()
def demo_cwd(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from jt5.tokenizer import tokenizer_files
    from tests import hf_models
    hf_dir = tmp_path / "runs" / "pretrain" / "hf"
    hf_models.build("byt5", hf_dir)
    for name, content in tokenizer_files("byte").items():
        (hf_dir / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, demo_cwd, capsys):
    code = python_blocks()[index]
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
