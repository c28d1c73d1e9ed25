"""Block sizes of the kernels and the per-device table that picks them (what the kernels read).

``get_block_sizes`` looks up ``tuning_table.json`` (beside this file), keyed by device kind,
head dim, dtype, causal and power-of-two buckets of the query/key lengths, and falls back to
``heuristic_block_sizes``. Entries carry ``"source"``: ``"heuristic"`` (not measured: written by
hand), ``"compiled"`` (the heuristic's tiles compiled to machine code on a CPU and found
spill-free) or ``"measured"`` (by the autotuner on a GPU). The file's ``"search_space"`` holds,
per arch, head dim and dtype, the tile choices that compiled spill-free. Writing the table
(autotuning, pruning) is ``tuning.py``'s; it imports the kernels, this module imports nothing.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import os

import numpy as np

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning_table.json")
_MIN_BUCKET, _MAX_BUCKET = 128, 32768
_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")


_TARGET = contextvars.ContextVar("jt5_kernel_target", default=None)


@contextlib.contextmanager
def compile_target(device):
    """Kernels traced inside choose tiles (``get_block_sizes``) and grid sizes (SM count) for
    ``device``, e.g. a GPU of a topology that ``jt5 plan`` compiles for from a CPU machine,
    instead of ``jax.devices()[0]``."""
    token = _TARGET.set(device)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_device():
    """The device the kernels are compiled for: ``compile_target``'s, else jax's first."""
    device = _TARGET.get()
    if device is None:
        import jax
        device = jax.devices()[0]
    return device


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _check_block(name: str, b) -> None:
    if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
        raise ValueError(f"{name}={b!r} must be a power of two >= 16 (Triton tiles)")


def _check_positive(obj, names) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            raise ValueError(f"{name}={getattr(obj, name)!r} must be >= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tiles and Triton launch parameters of ``flash_attention``; blocks are powers of two >= 16.

    Forward: ``block_q x block_k``. Backward: the dk/dv kernel holds a ``block_k_dkv`` key
    block and walks ``block_q_dkv`` query blocks; the dq kernel holds a ``block_q_dq`` query
    block and walks ``block_k_dq`` key blocks. Blocks larger than the (power-of-two rounded)
    sequence are shrunk to it.
    """
    block_q: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def validate(self) -> "BlockSizes":
        for name in _BLOCK_FIELDS:
            _check_block(name, getattr(self, name))
        _check_positive(self, ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"))
        return self

    def fitted(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrink blocks to the power-of-two rounded lengths (a 5-token query uses 16 rows)."""
        tq, tk = max(16, next_power_of_2(q_len)), max(16, next_power_of_2(kv_len))
        return dataclasses.replace(
            self, block_q=min(self.block_q, tq), block_k=min(self.block_k, tk),
            block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, tk),
            block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, tk))


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBlockSizes:
    """``decode_attention``: key block per loop step (a power of two >= 16) and the number of
    split-K programs per (batch, head); ``num_splits=None`` picks enough programs for two waves
    of the GPU's SMs (two in interpret mode, to keep CPU tests fast and still exercise the
    combine)."""
    block_k: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    def validate(self) -> "DecodeBlockSizes":
        _check_block("block_k", self.block_k)
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits!r} must be >= 1 or None")
        _check_positive(self, ("num_warps", "num_stages"))
        return self


# Interpret mode (CPU): each grid step is a loop iteration of an XLA program, so fewer, larger
# tiles are faster; the numbers only matter for test speed.
_INTERPRET = BlockSizes(block_q=64, block_k=64, block_q_dkv=64, block_k_dkv=64,
                        block_q_dq=64, block_k_dq=64)


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length, clamped to [128, 32768]."""
    return int(min(max(next_power_of_2(n), _MIN_BUCKET), _MAX_BUCKET))


def normalize_device_kind(kind: str) -> str:
    return "_".join(str(kind).lower().replace("-", " ").split())


def table_key(device_kind: str, T: int, S: int, H: int, dtype, causal: bool) -> str:
    return (f"{normalize_device_kind(device_kind)}|H{int(H)}|{np.dtype(dtype).name}|"
            f"{'causal' if causal else 'full'}|T{length_bucket(T)}|S{length_bucket(S)}")


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime: float) -> dict:
    del mtime  # part of the cache key only: a rewritten table is read again
    with open(path) as f:
        return json.load(f)


def load(path: str = TABLE_PATH) -> dict:
    """The whole table file (``{}`` if there is none)."""
    return _load_cached(path, os.path.getmtime(path)) if os.path.exists(path) else {}


def load_table(path: str = TABLE_PATH) -> dict:
    return load(path).get("entries", {})


def load_search_space(path: str = TABLE_PATH) -> dict:
    """``search_space_key -> {"fwd": [fwd_part, ...], "bwd": [bwd_part, ...], ...}``."""
    return load(path).get("search_space", {})


def search_space_key(arch: str, H: int, dtype) -> str:
    return f"{arch}|H{int(H)}|{np.dtype(dtype).name}"


def fwd_part(bs: BlockSizes) -> tuple:
    """The fields the forward kernel depends on."""
    return (bs.block_q, bs.block_k, bs.num_warps, bs.num_stages)


def bwd_part(bs: BlockSizes) -> tuple:
    """The fields the two backward kernels depend on."""
    return (bs.block_q_dkv, bs.block_k_dkv, bs.block_q_dq, bs.block_k_dq, bs.num_warps_bwd,
            bs.num_stages_bwd)


def heuristic_block_sizes(device_kind: str, T: int, S: int, H: int, dtype, causal: bool,
                          ) -> BlockSizes:
    """Untuned defaults: the Triton/FlashAttention-2 tutorial shapes, smaller for big heads."""
    del causal
    kind = normalize_device_kind(device_kind)
    if kind in ("interpret", "cpu"):
        bs = _INTERPRET
    elif H <= 64:   # Hopper/Ampere, T5's head dim. 8 warps: at 4 the 128x64 forward tile
        # spills under every elementwise mask (255 registers; see jt5.pallas_kernels.compile_check)
        bs = BlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=3,
                        block_q_dkv=32, block_k_dkv=64, block_q_dq=64, block_k_dq=32,
                        num_warps_bwd=4, num_stages_bwd=2)
    else:           # H = 128 (t5-3b/11b) and up: halve the tiles to keep registers in check
        wide = np.dtype(dtype).itemsize >= 4
        bs = BlockSizes(block_q=64 if wide else 128, block_k=32 if wide else 64,
                        num_warps=8 if not wide else 4, num_stages=2,
                        block_q_dkv=32, block_k_dkv=32 if wide else 64,
                        block_q_dq=32 if wide else 64, block_k_dq=32,
                        num_warps_bwd=4 if wide else 8, num_stages_bwd=2)
    return bs.validate().fitted(T, S)


def get_block_sizes(device_kind: str, T: int, S: int, H: int, dtype, causal: bool = False, *,
                    path: str = TABLE_PATH) -> BlockSizes:
    """The table's entry for this shape bucket if there is one, else ``heuristic_block_sizes``.
    No block is larger than the power-of-two rounded sequence (the kernel does the same)."""
    entry = load_table(path).get(table_key(device_kind, T, S, H, dtype, causal))
    if entry is not None:
        fields = {f.name for f in dataclasses.fields(BlockSizes)}
        bs = BlockSizes(**{k: v for k, v in entry["block_sizes"].items() if k in fields})
        return bs.validate().fitted(T, S)
    return heuristic_block_sizes(device_kind, T, S, H, dtype, causal)
