"""The Mosaic GPU attention kernels in Mosaic GPU's CPU interpreter against the dense oracle
(``reference.attention_reference`` in float32): output, lse, dq/dk/dv and the bias-table
gradient over the mask kinds, with the interpreter's race detector on; a kernel with one barrier
wait removed is caught by it.

The interpreter simulates shared memory, TMA, barriers and the three warpgroups of every CTA
(sequentially over the grid): ~1-2 s per CTA, so shapes are small and the heavier cases are
``slow``. Each test runs under a deadline: a barrier nobody completes would hang the
interpreter, so the process ends with every thread's stack instead (faulthandler).
"""
from __future__ import annotations

import faulthandler
import linecache
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels import mosaic_common as mc
from jt5.pallas_kernels import mosaic_fwd
from jt5.pallas_kernels.mosaic_attention import mosaic_attention
from jt5.pallas_kernels.reference import attention_reference
from jt5.pallas_kernels.spec import MASK_VALUE, Mask, RelativeBias
from tests.conftest import assert_close
from tests.pallas_kernels.test_flash_attention import _segments

DEADLINE_S = 300


@pytest.fixture(autouse=True)
def interpreter(capfd):
    """Per-test deadline; the interpreter's state reset after a failure; no race reported."""
    faulthandler.dump_traceback_later(DEADLINE_S, exit=True)
    try:
        yield capfd
    finally:
        faulthandler.cancel_dump_traceback_later()
        mc.reset_interpreter()
    assert "RACE DETECTED" not in capfd.readouterr().out


def _inputs(B, T, S, N, H, dtype, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(0.5 * r.standard_normal((B, T, N, H)), dtype)
    k, v = (jnp.asarray(r.standard_normal((B, S, N, H)), dtype) for _ in range(2))
    return q, k, v, jnp.asarray(r.standard_normal((32, N)), jnp.float32)


def _f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


# (id, B, T, S, N, H, dtype, mask builder, bidirectional bias or None for no bias, q_offset)
def _padding(B, T, S):   # batch row 0: every key padding (rows with no visible key -> zeros)
    kv = np.ones((B, S), np.int32)
    kv[0] = 0
    kv[1:, S - 30:] = 0
    return Mask(kv_segment_ids=jnp.asarray(kv))


def _packing_causal(B, T, S):  # q segment 3 has no keys; q tail and kv tail are padding
    q = np.stack([_segments([60, 50, 20], T)] * B)
    kv = np.stack([_segments([90, 100], S)] * B)
    return Mask(q_segment_ids=jnp.asarray(q), kv_segment_ids=jnp.asarray(kv), causal=True)


def _local_global(B, T, S):
    return Mask(local_window=70, num_global_tokens=3)


def _case_id(case):
    return case[0]


FORWARD = [
    # far blocks to the right of the band (key block 3 vs query block 0; near = 2)
    ("padding-bias-bf16-h64", 2, 100, 200, 1, 64, jnp.bfloat16, _padding, True, 0),
    ("packing-causal-offset-f16-h128", 1, 150, 210, 1, 128, jnp.float16, _packing_causal,
     False, 37),
    ("local-global-bf16-h32", 1, 256, 256, 1, 32, jnp.bfloat16, _local_global, True, 0),
    pytest.param(("cross-nobias-f16-h64", 2, 70, 130, 1, 64, jnp.float16, _padding, None, 0),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", FORWARD, ids=_case_id)
def test_forward_and_lse_equal_the_oracle(case):
    _, B, T, S, N, H, dtype, make_mask, bidirectional, q_offset = case
    q, k, v, table = _inputs(B, T, S, N, H, dtype)
    mask = make_mask(B, T, S)
    bias = None if bidirectional is None else RelativeBias(table, bidirectional=bidirectional)
    off = jnp.int32(q_offset)      # traced: the worst-case bias band
    out, lse = jax.jit(lambda q, k, v, off: mosaic_attention(
        q, k, v, mask, bias, q_offset=off, return_lse=True))(q, k, v, off)
    want, want_lse = attention_reference(*_f32(q, k, v), mask, bias, q_offset=q_offset,
                                         return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, N, T)
    assert_close(out, want, dtype=dtype, check="attention", what="out")
    empty = np.asarray(want_lse) == MASK_VALUE
    assert np.array_equal(np.asarray(lse) == MASK_VALUE, empty)
    assert np.all(np.asarray(out, np.float32)[np.moveaxis(empty, 1, 2)] == 0.0)
    assert_close(np.where(empty, 0, lse), np.where(empty, 0, want_lse), dtype="float32",
                 check="attention", what="lse")
    if make_mask is _padding:
        assert empty[0].all()          # the case exercises rows that see nothing


def _grads(fn, q, k, v, table, mask, bidirectional, q_offset, g, g_lse):
    def loss(q, k, v, table):
        out, lse = fn(q, k, v, mask, RelativeBias(table, bidirectional=bidirectional),
                      q_offset=q_offset, return_lse=True)
        lse = jnp.where(lse == MASK_VALUE, 0.0, lse)
        return jnp.sum(out.astype(jnp.float32) * g) + jnp.sum(lse * g_lse)
    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, table)


BACKWARD = [
    # far blocks on both sides (4 x 4 blocks, near = 2), padding keys, the lse cotangent
    ("padding-bias-bf16-h64", 1, 200, 256, 1, 64, jnp.bfloat16, _padding, True, 0),
    pytest.param(("packing-causal-offset-f16-h128", 1, 150, 210, 1, 128, jnp.float16,
                  _packing_causal, False, 37), marks=pytest.mark.slow),
    pytest.param(("local-global-bf16-h32", 1, 256, 320, 2, 32, jnp.bfloat16, _local_global,
                  True, 0), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", BACKWARD, ids=_case_id)
def test_gradients_equal_the_oracle(case):
    """dq, dk, dv and the bias table's gradient (band tiles + far row sums), with an lse
    cotangent, against the float32 oracle's autodiff."""
    _, B, T, S, N, H, dtype, make_mask, bidirectional, q_offset = case
    q, k, v, table = _inputs(B, T, S, N, H, dtype, seed=1)
    mask = make_mask(B, T, S)
    r = np.random.default_rng(2)
    g = jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32)
    g_lse = jnp.asarray(r.standard_normal((B, N, T)), jnp.float32)
    got = jax.jit(lambda *a: _grads(mosaic_attention, *a, mask, bidirectional, q_offset, g,
                                    g_lse))(q, k, v, table)
    want = _grads(attention_reference, *_f32(q, k, v), table, mask, bidirectional, q_offset, g,
                  g_lse)
    for name, a, b in zip(("dq", "dk", "dv", "dtable"), got, want):
        assert a.dtype == (jnp.float32 if name == "dtable" else dtype)
        assert_close(a, b, dtype=dtype, check="attention_grad", what=name)


class _WithoutVWait:
    """``plgpu`` as the forward kernel sees it, except that the wait for V's TMA copy before
    ``P V`` is dropped (a seeded bug)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def barrier_wait(self, barrier):
        caller = sys._getframe(1)
        if 'r["v_ready"]' in linecache.getline(caller.f_code.co_filename, caller.f_lineno):
            return None
        return self._real.barrier_wait(barrier)


def test_race_detector_catches_a_missing_barrier_wait(interpreter, monkeypatch):
    q, k, v, _ = _inputs(1, 128, 128, 1, 64, jnp.bfloat16)
    monkeypatch.setattr(mosaic_fwd, "plgpu", _WithoutVWait(mosaic_fwd.plgpu))
    jax.block_until_ready(jax.jit(lambda q, k, v: mosaic_attention(q, k, v))(q, k, v))
    out = interpreter.readouterr().out
    assert "RACE DETECTED" in out and mc.races_found(), out[-2000:]


def test_bad_inputs_name_the_problem():
    q, k, v, _ = _inputs(1, 8, 8, 1, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 or float16 .*got float32"):
        mosaic_attention(*_f32(q, k, v))
    wide = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="head dim 256 > 128"):
        mosaic_attention(wide, wide, wide)
    with pytest.raises(ValueError, match="semantics='lanes'"):
        mosaic_attention(q, k, v, semantics="lanes")
