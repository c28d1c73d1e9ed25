"""``benchmarks/gpu.sh --dry-run`` runs every step on CPU at tiny sizes, so the script that a lent
GPU's few minutes depend on cannot rot."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["gpu_tests", "autotune", "mosaic", "attention", "encoder", "generate", "train", "plan"]


# ~70 s on 2 idle cores (six Python processes, each compiling jax programs): in CI on purpose,
# the issue asks that the dry run cannot rot.
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils timeout")
def test_gpu_script_dry_run(tmp_path):
    # The script's own environment, not the test session's 8 fake CPU devices (conftest).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "OUT")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    # No output folder: the dry run makes a temporary one and says where.
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--dry-run"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    out = Path(proc.stdout.split("output folder: ", 1)[1].split("\n", 1)[0])
    assert out.parent == tmp_path, proc.stdout[:500]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    logs = {s: (out / f"{s}.log").read_text()[-2000:] for s in STEPS if (out / f"{s}.log").exists()}
    assert proc.returncode == 0 and set(STEPS) <= set(status) and set(status.values()) == {
        "ok"}, (
        proc.stdout[-3000:], proc.stderr[-2000:], logs)
    md = (out / "summary.md").read_text()
    assert "| attention | ok |" in md and "## encoder" in md and "jt5_pallas" in md
    assert {r["impl"] for r in json.loads((out / "attention.json").read_text())["rows"]} >= {
        "jt5_flash", "pallas_mha", "dpa_xla"}
    mosaic = json.loads((out / "mosaic.json").read_text())   # interpreted Mosaic GPU kernels
    assert mosaic["mosaic_check"]["semantics"] == "lane" and len(mosaic["rows"]) == 2
    assert all("fwd_s" in r for r in mosaic["rows"]) and "## mosaic" in md
    # jt5 plan's prediction beside each measured job (no GPU here: the CPU compile's temps)
    from jt5.pallas_kernels.gpu_targets import has_plugin
    if not has_plugin():
        return
    checked = json.loads((out / "plan_check.json").read_text())["rows"]
    assert {r["job"].split()[0] for r in checked} == {"encoder", "train"}, checked
    assert all(r["plan_total"] > 0 for r in checked) and "## plan_check" in md


def test_gpu_script_needs_an_output_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
