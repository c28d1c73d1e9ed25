"""Block-size table lookup and heuristic (``blocks``, CPU); the table writers (``tuning``); the
autotuner itself only on a GPU. ``blocks`` imports no kernel: the import graph has no cycle."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

from jt5.pallas_kernels import blocks, tuning
from jt5.pallas_kernels.blocks import BlockSizes

H100 = "NVIDIA H100 80GB HBM3"


def _is_pow2(x):
    return x >= 16 and x & (x - 1) == 0


def test_length_buckets_cover_every_length_once():
    """A bucket is the smallest power of two holding the length (between the table's smallest
    and largest bucket): consecutive lengths change bucket exactly at powers of two."""
    lo, hi = blocks.length_bucket(1), blocks.length_bucket(10**9)
    assert lo < hi and _is_pow2(lo) and _is_pow2(hi)
    prev = None
    for n in range(1, 4 * hi, 97):
        b = blocks.length_bucket(n)
        assert _is_pow2(b) and lo <= b <= hi
        assert b >= n or b == hi
        assert b == lo or b // 2 < n
        assert prev is None or b >= prev
        prev = b


def test_table_keys_tell_apart_what_the_kernels_specialise_on():
    """Lengths in one bucket share a key; the device (spelling aside), head dim, dtype, causal
    flag and either length's bucket each make another."""
    base = dict(device_kind=H100, T=2000, S=77, H=64, dtype=jnp.bfloat16, causal=True)
    key = blocks.table_key(**base)
    assert blocks.table_key(**{**base, "T": 1025, "S": 1}) == key
    assert blocks.table_key(**{**base, "device_kind": "nvidia-h100  80gb hbm3"}) == key
    for change in ({"device_kind": "NVIDIA H200"}, {"H": 128}, {"dtype": jnp.float16},
                   {"causal": False}, {"T": 2049}, {"S": 129}):
        assert blocks.table_key(**{**base, **change}) != key, change


@pytest.mark.parametrize("kind", [H100, "NVIDIA H200", "interpret", "cpu", "unknown gpu"])
@pytest.mark.parametrize("T,S,H,dtype", [(1, 77, 64, "bfloat16"), (300, 300, 64, "float32"),
                                         (4096, 512, 128, "bfloat16"), (40, 33, 48, "float16")])
def test_heuristic_is_valid_and_fits_the_lengths(kind, T, S, H, dtype):
    bs = blocks.get_block_sizes(kind, T, S, H, dtype, causal=False)
    for name in ("block_q", "block_q_dkv", "block_q_dq"):
        v = getattr(bs, name)
        assert _is_pow2(v) and v <= max(16, 1 << (T - 1).bit_length()), (name, v)
    for name in ("block_k", "block_k_dkv", "block_k_dq"):
        v = getattr(bs, name)
        assert _is_pow2(v) and v <= max(16, 1 << (S - 1).bit_length()), (name, v)


def test_interpret_mode_uses_small_blocks():
    bs = blocks.get_block_sizes("interpret", 4096, 4096, 64, "float32")
    assert max(bs.block_q, bs.block_k, bs.block_q_dkv, bs.block_k_dkv) <= 64


def test_table_entry_wins_over_heuristic(tmp_path):
    path = tmp_path / "table.json"
    tuned = BlockSizes(block_q=64, block_k=32, num_warps=8, num_stages=3, block_q_dkv=16,
                       block_k_dkv=128, block_q_dq=128, block_k_dq=16)
    key = blocks.table_key(H100, 2048, 2048, 64, "bfloat16", False)
    tuning.write_entries({key: {"block_sizes": dataclasses.asdict(tuned), "source": "measured"}},
                         str(path))
    assert blocks.get_block_sizes(H100, 1500, 2048, 64, "bfloat16", path=str(path)) == tuned
    # another bucket, dtype or causal flag: the heuristic
    other = blocks.get_block_sizes(H100, 2048, 2048, 64, "bfloat16", True, path=str(path))
    assert other == blocks.heuristic_block_sizes(H100, 2048, 2048, 64, "bfloat16", True)
    # merging keeps the old entry
    tuning.write_entries({"x|H64|float32|full|T128|S128": {"block_sizes": {}, "source": "m"}},
                         str(path))
    assert key in json.loads(path.read_text())["entries"]


def test_shipped_table_is_valid_and_honest():
    data = json.load(open(blocks.TABLE_PATH))
    assert data["entries"], "empty table"
    for key, entry in data["entries"].items():
        assert entry["source"] in ("heuristic", "compiled", "measured"), key
        if entry["source"] == "measured":
            assert "fwd_ms" in entry and "fwd_bwd_ms" in entry, key
        if entry["source"] == "compiled":   # checked on a CPU: spill-free, within smem
            for part in ("fwd", "bwd"):
                stats = entry["compile"][part]
                assert stats["spill_bytes"] == 0 and stats["regs"] <= 255, (key, part, stats)
        BlockSizes(**entry["block_sizes"]).validate()
        kind, h, dtype, causal, t, s = key.split("|")
        assert causal in ("causal", "full") and h.startswith("H") and t.startswith("T")


def test_candidates_are_valid():
    for H in (64, 128):
        cands = tuning.candidates(H, "bfloat16")
        assert len(cands) > 10 and len(set(cands)) == len(cands)
        for bs in cands:
            bs.validate()


def test_shipped_entries_are_in_the_pruned_search_space():
    """Every unmeasured entry's tiles compiled spill-free (``--prune`` wrote both)."""
    spaces = blocks.load_search_space()
    for key, entry in blocks.load_table().items():
        arch = tuning.arch_of(key.split("|")[0])
        space = spaces.get(blocks.search_space_key(arch, int(key.split("|")[1][1:]),
                                                   key.split("|")[2]))
        if entry["source"] == "measured" or space is None:
            continue
        bs = BlockSizes(**entry["block_sizes"])
        assert list(blocks.fwd_part(bs)) in space["fwd"], key
        assert list(blocks.bwd_part(bs)) in space["bwd"], key


def test_search_space_prunes_candidates(tmp_path):
    path = str(tmp_path / "table.json")
    full = tuning.candidates(64, "bfloat16", path=path)      # no search space: everything
    assert full == tuning.candidates(64, "bfloat16", pruned=False)
    keep = full[3]
    tuning.write_search_space(blocks.search_space_key("sm_90a", 64, "bfloat16"),
                              {"fwd": [list(blocks.fwd_part(keep))],
                               "bwd": [list(blocks.bwd_part(keep))], "stats": {}}, path)
    assert tuning.candidates(64, "bfloat16", path=path) == [keep]
    assert tuning.candidates(64, "bfloat16", arch="sm_80", path=path) == full   # not pruned
    assert tuning.candidates(64, "float16", path=path) == tuning.candidates(
        64, "float16", pruned=False)
    assert "stats" not in json.loads(open(path).read())["search_space"]["sm_90a|H64|bfloat16"]


def test_compiled_entries_refuse_a_spilling_heuristic(tmp_path):
    path = str(tmp_path / "table.json")
    key = blocks.table_key(H100, 2048, 2048, 64, "bfloat16", False)
    bs = blocks.heuristic_block_sizes(H100, 2048, 2048, 64, "bfloat16", False)
    tuning.write_entries({key: {"block_sizes": dataclasses.asdict(bs), "source": "heuristic"}},
                         path)
    f, b = list(blocks.fwd_part(bs)), list(blocks.bwd_part(bs))
    stats = {"fwd:" + ",".join(map(str, f)): {"spill_bytes": 0},
             "bwd:" + ",".join(map(str, b)): {"spill_bytes": 0}}
    space = {"fwd": [f], "bwd": [b], "stats": stats, "masks": ["padding"], "triton": "3.9.0",
             "jax": jax.__version__}
    (entry,) = tuning.compiled_entries(space, 64, "bfloat16", "sm_90a", path).values()
    assert entry["source"] == "compiled" and entry["block_sizes"] == dataclasses.asdict(bs)
    assert tuning.compiled_entries(space, 64, "bfloat16", "sm_80", path) == {}  # an H100 entry
    with pytest.raises(RuntimeError, match="do not compile spill-free"):
        tuning.compiled_entries({**space, "fwd": []}, 64, "bfloat16", "sm_90a", path)


def test_heuristic_avoids_the_spilling_h64_forward_tile():
    """128x64 at 4 warps spills under masks on sm_90a (test_compile checks the real thing)."""
    for dtype in ("bfloat16", "float16"):
        bs = blocks.heuristic_block_sizes(H100, 4096, 4096, 64, dtype, False)
        assert (bs.block_q, bs.block_k, bs.num_warps) == (128, 64, 8)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_autotune_refuses_without_gpu():
    with pytest.raises(RuntimeError, match="needs a GPU"):
        tuning.autotune(write=False)


def test_cli_show_runs(capsys):
    tuning.main(["--show"])
    assert "nvidia" in capsys.readouterr().out


@pytest.mark.gpu
def test_autotune_on_gpu_small(tmp_path):
    entries = tuning.autotune(shapes=((2, 512, 512, 4, 64),), causal_options=(False,),
                              write=True, path=str(tmp_path / "t.json"), max_candidates=2,
                              verbose=False)
    (entry,) = entries.values()
    assert entry["source"] == "measured" and entry["fwd_ms"] > 0
