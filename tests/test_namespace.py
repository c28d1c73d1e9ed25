"""What jt5 installs resolves unambiguously: bridge/, train/ and pallas_kernels/ are jt5.bridge,
jt5.train and jt5.pallas_kernels, so a user's own bridge.py / train.py / pallas_kernels.py beside
their script neither shadows jt5's code nor is shadowed by it."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "train", "pallas_kernels")

SCRIPT = """
import sys
import numpy as np
import jt5
from jt5.pallas_kernels import flash_attention
from jt5.train import runner, step            # noqa: F401  (the training stack imports)
import jt5.cli                                  # noqa: F401

config = jt5.preset("tiny", vocab_size=64)
model = jt5.init_model(config)
model.save_pretrained(sys.argv[1])             # through jt5.bridge
back = jt5.T5ForConditionalGeneration.from_pretrained(sys.argv[1])
ids = np.ones((1, 8), np.int32)
a = np.asarray(model(ids, ids, np.ones_like(ids)))
b = np.asarray(back(ids, ids, np.ones_like(ids)))
assert np.array_equal(a, b)
top = sorted(m for m in sys.modules if m.split(".")[0] in ("bridge", "train", "pallas_kernels"))
assert not top, top
print("ok", jt5.bridge.__name__, flash_attention.__module__)
"""


def test_users_own_bridge_train_and_pallas_kernels_files_shadow_nothing(tmp_path):
    for name in PACKAGES:  # a user's files with jt5's folder names, first on sys.path
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user file {name}.py was imported')\n")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # also works from a bare source checkout
        [p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p]), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "script.py", str(tmp_path / "hf")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok jt5.bridge jt5.pallas_kernels.flash_attention" in r.stdout


@pytest.mark.parametrize("name", PACKAGES)
def test_the_folders_refuse_a_second_top_level_identity(name):
    """``import bridge`` from the checkout's root would make a second copy of every module (two
    classes named CheckpointError, two loggers): it fails and says which name to use."""
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0
    assert f"import this package as jt5.{name}, not {name}" in r.stderr


def test_the_wheel_installs_everything_under_jt5(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside pyproject
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("jt5",) + PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path), str(src)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("jt5-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"jt5"}, tops
    for want in ("jt5/bridge/keymap.py", "jt5/train/loop.py", "jt5/pallas_kernels/flash_attention.py",
                 "jt5/pallas_kernels/tuning_table.json"):
        assert want in names, want


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (lazy imports included)."""
    import ast
    files = {}
    for folder, name in (("jt5", "jt5"),) + tuple((p, f"jt5.{p}") for p in PACKAGES):
        for f in (ROOT / folder).glob("*.py"):
            files[name if f.stem == "__init__" else f"{name}.{f.stem}"] = f
    graph = {}
    for mod, f in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:  # `from jt5 import model` names a module
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in files else node.module)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def test_no_import_cycles_between_files():
    """No file imports (directly or through others) a file that imports it back — lazy,
    in-function imports included: they are circles all the same, only hidden from Python."""
    graph = _import_graph()
    assert graph["jt5.model"] and "jt5.bridge.hf" in graph["jt5.weights"]  # the graph is real

    def reaches(a, b, seen):
        return any(d == b or (d not in seen and not seen.add(d) and reaches(d, b, seen))
                   for d in graph[a])

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in graph for b in graph[a]
                    if not b.endswith(("jt5", "__init__")) and (b == a or reaches(b, a, set())))
    assert not cycles, "\n".join(cycles)
