"""Every kernel configuration the model can launch compiles to machine code within the target's
limits: no compile error, shared memory under the limit, no register spill (pip triton, no GPU;
``python -m jt5.pallas_kernels.compile_check`` prints the same table)."""
from __future__ import annotations

import json
import tempfile

import pytest

pytest.importorskip("triton")

from jt5.pallas_kernels import compile_check as cc  # noqa: E402
from jt5.pallas_kernels.blocks import BlockSizes  # noqa: E402
from jt5.pallas_kernels.triton_compile import parse_ptxas_log  # noqa: E402


# sm_90a (H100/H200, the GPUs this project is lent) in CI; sm_80 (A100) with the slow tests: the
# same Triton pipeline for another target, ~85 s of the 30-minute CI budget on 2 cores.
@pytest.mark.parametrize("arch", ["sm_90a", pytest.param("sm_80", marks=pytest.mark.slow)])
def test_every_selected_configuration_compiles_spill_free(arch):
    configs = cc.configurations(arch)
    # the selection covers what the model launches
    assert {c.mask for c in configs} == set(cc.FLASH_MASKS + cc.DECODE_MASKS)
    assert {(c.dtype, c.head_dim) for c in configs} == {
        (d, h) for d in ("bfloat16", "float16") for h in (64, 128)}
    rows = cc.run_check(configs, arch)
    assert {r["kernel"] for r in rows} == {"t5_flash_fwd", "t5_flash_bwd_dkv", "t5_flash_bwd_dq",
                                          "t5_flash_decode"}
    failing = [cc.format_row(r) for r in rows if r["problems"]]
    assert not failing, f"{len(failing)} of {len(rows)} kernels fail on {arch}:\n" + "\n".join(
        failing)


def test_the_check_catches_a_spilling_tile():
    """The old H64 forward default (128x64 at 4 warps, 3 stages) spills under a packing mask."""
    old = BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=3)
    fwd, *_ = cc.lower_config(cc.Config("flash", "bfloat16", 64, "packing", old))
    assert fwd.name == "t5_flash_fwd" and (fwd.num_warps, fwd.num_stages) == (4, 3)
    with tempfile.TemporaryDirectory() as d:
        res = cc._compile_one(fwd, "sm_90a", d)
    assert res["ok"] and res["regs"] >= 240, res   # at the 255-register ceiling
    assert any(p.startswith("spills") for p in cc.problems(res, "sm_90a")), res


def test_problems_name_the_limit_and_the_failing_stage():
    ok = dict(ok=True, shared=100 * 1024, regs=128, spill_stores=0, spill_loads=0)
    assert cc.problems(ok, "sm_90a") == [] and cc.problems(ok, "sm_80") == []
    big = {**ok, "shared": 200 * 1024}
    assert cc.problems(big, "sm_90a") == []
    assert cc.problems(big, "sm_80") == [
        f"shared memory {200 * 1024} B > sm_80 limit {163 * 1024} B"]
    assert "spills 8 B stored" in cc.problems({**ok, "spill_stores": 8}, "sm_90a")[0]
    assert cc.problems({"ok": False, "stage": "ttgir", "error": "boom"}, "sm_90a") == [
        "compile error at ttgir: boom"]


def test_ptxas_log_parsing():
    log = ("ptxas info    : Function properties for k\n"
           "    24 bytes stack frame, 60 bytes spill stores, 36 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers\n"
           "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
           "are serialized due to ...\n"
           "ptxas warning : Registers are spilled to local memory in function 'k'\n")
    out = parse_ptxas_log(log)
    assert (out["regs"], out["stack"], out["spill_stores"], out["spill_loads"]) == (255, 24, 60, 36)
    assert len(out["warnings"]) == 2 and out["warnings"][0].startswith("(C7515)")
    assert cc._short_warnings(out["warnings"]) == "C7515 Registers are spilled"


def test_unparsable_module_is_a_compile_error(tmp_path):
    bad = cc.Kernel("t5_flash_fwd", "module { this is not mlir }", 4, 2)
    res = cc._compile_one(bad, "sm_90a", str(tmp_path))
    assert not res["ok"] and res["stage"] == "parse", res
    assert cc.problems(res, "sm_90a")[0].startswith("compile error at parse")


def test_cli_help_and_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cc.main(["--help"])
    assert e.value.code == 0 and "--arch" in capsys.readouterr().out
    out = tmp_path / "rows.json"
    rc = cc.main(["--kernels", "decode", "--dtypes", "bfloat16", "--head-dims", "64",
                  "--masks", "cross", "--json", str(out)])
    table = capsys.readouterr().out
    assert rc == 0 and "| t5_flash_decode | bfloat16 | 64 | cross | 1x128 | 4/2 |" in table
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] and row["spill_stores"] == 0 and row["shared"] < cc.SMEM_LIMIT["sm_90a"]
    with pytest.raises(ValueError, match="arch='sm_75'"):
        cc.run_check([], "sm_75")


def test_unknown_selection_names_the_value():
    with pytest.raises(ValueError, match="mask 'causal_only'"):
        cc.configurations("sm_90a", masks=("causal_only",))
    with pytest.raises(ValueError, match="arch 'sm_75'"):
        cc.configurations("sm_75")
