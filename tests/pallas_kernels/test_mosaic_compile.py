"""The Mosaic GPU kernels compile to sm_90a for every configuration the model can launch (both
16-bit dtypes, head dims 64 and 128, every mask kind; forward, dq, dk/dv and the bias band)
through XLA's GPU pipeline with jax's CUDA plugin on this CPU machine, within shared memory and
without a register spill (ptxas -v). The Triton kernels' gate is ``test_compile.py``."""
from __future__ import annotations

import json

import pytest

from jt5.pallas_kernels import gpu_targets

pytestmark = pytest.mark.skipif(not gpu_targets.has_plugin(), reason=gpu_targets.PLUGIN_HINT)

from jt5.pallas_kernels import compile_check as cc  # noqa: E402
from jt5.pallas_kernels import mosaic_compile as mcc  # noqa: E402


# The pinned semantics (Lane) in CI; Warpgroup (jax 0.11's default, gpu.sh's fallback) with the
# slow tests. ~24 compiles of 4 kernels: ~1 s per kernel on 2 idle cores.
@pytest.mark.parametrize("semantics", ["lane", pytest.param("warpgroup", marks=pytest.mark.slow)])
def test_every_configuration_compiles_for_sm90a_without_spills(semantics):
    configs = mcc.configurations(semantics=(semantics,))
    assert {c[0] for c in configs} == set(cc.FLASH_MASKS)
    rows = mcc.run_check(configs)
    assert {r["kernel"] for r in rows} == set(mcc.KERNELS)
    assert len(rows) == sum(len(mcc.kernels(h, bias=m != "cross")) for m, _, h, _ in configs)
    failing = [cc.format_row(r) for r in rows if r["problems"]]
    assert not failing, f"{len(failing)} of {len(rows)} kernels fail:\n" + "\n".join(failing)
    for r in rows:
        assert r["ok"] and r["arch"] == "sm_90a" and r["regs"] and r["spill_stores"] == 0
        assert r["shared"] is None or 0 < r["shared"] <= cc.SMEM_LIMIT["sm_90a"]


def test_over_budget_shared_memory_fails_the_gate():
    """Eight ring slots of 64 x 128 K/V tiles (plus Q and the bias tiles) exceed 227 KiB: the
    lowering refuses it and the gate reports a compile error."""
    rows = mcc.compile_config("none", "bfloat16", 128, stages=8)
    fwd = rows["t5_mosaic_fwd"]
    assert not fwd["ok"] and "shared memory" in fwd["error"], fwd
    assert cc.problems(fwd, "sm_90a")[0].startswith("compile error")


def test_ptxas_report_is_split_per_kernel():
    log = ("ptxas info    : Compiling entry function 't5_mosaic_fwd_mosaic_gpu_kernel' for "
           "'sm_90a'\nptxas info    : Function properties for t5_mosaic_fwd_mosaic_gpu_kernel\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 16 barriers, 1 bytes smem\n"
           "ptxas info    : Compiling entry function 't5_mosaic_bwd_dq_mosaic_gpu_kernel' for "
           "'sm_90a'\n    8 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 232 registers, used 16 barriers\n")
    out = mcc.split_ptxas_log(log)
    assert out["t5_mosaic_fwd"]["regs"] == 168 and out["t5_mosaic_fwd"]["spill_stores"] == 0
    dq = dict(out["t5_mosaic_bwd_dq"], ok=True, shared=None)
    assert (dq["regs"], dq["spill_stores"], dq["arch"]) == (232, 12, "sm_90a")
    assert cc.problems(dq, "sm_90a") == ["spills 12 B stored / 8 B loaded"]


def test_cli_runs_the_gate(capsys, tmp_path):
    out = tmp_path / "rows.json"
    rc = mcc.main(["--dtypes", "float16", "--head-dims", "64", "--masks", "cross", "--json",
                   str(out)])
    table = capsys.readouterr().out
    assert rc == 0 and "| t5_mosaic_fwd | float16 | 64 | cross | 64x64 x2 WG | lane/2 |" in table
    assert "t5_mosaic_bwd_band" not in table      # no bias: no band kernel
    assert [r["kernel"] for r in json.loads(out.read_text())["rows"]] == [
        "t5_mosaic_fwd", "t5_mosaic_bwd_dq", "t5_mosaic_bwd_dkv"]
    with pytest.raises(ValueError, match="mask 'causal_only'"):
        mcc.configurations(masks=("causal_only",))
