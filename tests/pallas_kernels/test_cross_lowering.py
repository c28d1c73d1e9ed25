"""Lower the kernels for CUDA on a CPU machine: runs the real Pallas -> Triton lowering.

Interpret mode checks none of Triton's restrictions (power-of-two shapes, supported ops), so a
Triton lowering error must fail here, without a GPU (docs/design.md, "Attention").
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jt5.pallas_kernels.blocks import BlockSizes, heuristic_block_sizes
from jt5.pallas_kernels.flash_attention import flash_attention
from jt5.pallas_kernels.spec import Mask, RelativeBias

H100 = "NVIDIA H100 80GB HBM3"


def _mask_kwargs(kind, B, T, S):
    """(Mask, bias bidirectional, call keywords) of a mask kind."""
    if kind == "none":
        return Mask(), True, {}
    if kind == "padding":
        kv = np.ones((B, S), np.int32)
        kv[:, S // 2:] = 0
        return Mask(kv_segment_ids=jnp.asarray(kv)), True, {}
    if kind == "causal_packing":
        q = np.repeat(np.arange(1, 3, dtype=np.int32)[None], B, 0).repeat(-(-T // 2), 1)[:, :T]
        kv = np.repeat(np.arange(1, 3, dtype=np.int32)[None], B, 0).repeat(-(-S // 2), 1)[:, :S]
        return (Mask(q_segment_ids=jnp.asarray(q), kv_segment_ids=jnp.asarray(kv), causal=True),
                False, {})
    if kind == "local_global":
        return Mask(local_window=64, num_global_tokens=4), True, dict(q_offset=jnp.int32(3))
    raise ValueError(kind)


def _flash(mask=None, bidirectional=True, **kw):
    """``f(q, k, v, table=None)`` calling flash_attention with the spec objects."""
    def f(q, k, v, table=None):
        bias = None if table is None else RelativeBias(table, bidirectional=bidirectional)
        return flash_attention(q, k, v, mask, bias, **kw)
    return f


def _lower(fn, *args):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text, "expected Triton custom calls in the CUDA lowering"
    return text


CASES = [(dt, kind, H, bias)
         for dt in ("float32", "bfloat16", "float16")
         for kind, H, bias in (("none", 64, True), ("padding", 128, False),
                               ("causal_packing", 64, True), ("local_global", 128, True))]


@pytest.mark.parametrize("dtype,kind,H,bias", CASES,
                         ids=[f"{d}-{k}-H{h}-{'bias' if b else 'nobias'}" for d, k, h, b in CASES])
def test_fwd_and_bwd_lower_to_triton(dtype, kind, H, bias):
    B, T, S, N = 2, 300, 200, 4   # non-multiple lengths: the padded path lowers too
    dt = jnp.dtype(dtype)
    q = jnp.zeros((B, T, N, H), dt)
    k = jnp.zeros((B, S, N, H), dt)
    table = jnp.zeros((32, N), jnp.float32) if bias else None
    mask, bidirectional, kw = _mask_kwargs(kind, B, T, S)
    bs = heuristic_block_sizes(H100, T, S, H, dt, mask.causal)
    f = _flash(mask, bidirectional, block_sizes=bs, interpret=False, **kw)
    text = _lower(f, q, k, k, table)
    assert text.count("__gpu$xla.gpu.triton") == 1                          # forward only
    grad = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2, 3) if bias else (0, 1, 2))
    assert _lower(grad, q, k, k, table).count("__gpu$xla.gpu.triton") == 3   # fwd, dkv, dq


@pytest.mark.parametrize("blocks", [BlockSizes(), BlockSizes(block_q=32, block_k=16),
                                    BlockSizes(block_q_dkv=128, block_k_dkv=16,
                                               block_q_dq=16, block_k_dq=128)])
def test_block_size_variants_lower(blocks):
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    f = _flash(Mask(causal=True), block_sizes=blocks, interpret=False)
    grad = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))
    _lower(grad, q, q, q, jnp.zeros((32, 2), jnp.float32))


def test_lse_output_and_its_gradient_lower():
    """``return_lse``: the same three kernels, the lse cotangent folded into delta."""
    q = jnp.zeros((2, 200, 2, 64), jnp.bfloat16)
    f = _flash(Mask(local_window=32), return_lse=True, interpret=False)

    def loss(*a):
        out, lse = f(*a)
        return out.astype(jnp.float32).sum() + lse.sum()
    assert _lower(loss, q, q, q, jnp.zeros((32, 2), jnp.float32)).count("__gpu$xla.gpu.triton") == 1
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    assert _lower(grad, q, q, q, jnp.zeros((32, 2), jnp.float32)).count("__gpu$xla.gpu.triton") == 3


def test_non_power_of_two_block_fails_before_lowering():
    q = jnp.zeros((1, 96, 2, 64), jnp.bfloat16)
    f = _flash(block_sizes=BlockSizes(block_q=48, block_k=48), interpret=False)
    with pytest.raises(ValueError, match=r"block_q=48 must be a power of two"):
        jax.jit(f).trace(q, q, q).lower(lowering_platforms=("cuda",))


def _kernel_dot_precisions(**kw):
    q = jnp.zeros((1, 64, 1, 64), jnp.float32)
    grad = jax.grad(lambda *a: _flash(**kw)(*a).sum(), argnums=(0, 1, 2, 3))
    jaxpr = str(jax.make_jaxpr(grad)(q, q, q, jnp.zeros((32, 1), jnp.float32)))
    precisions = re.findall(r"dot_general\[.*?precision=([^\n]*)", jaxpr, flags=re.S)
    assert len(precisions) >= 7, precisions           # fwd 2, dkv 3, dq 2 in-kernel dots
    return set(precisions)


HIGHEST = "(Precision.HIGHEST, Precision.HIGHEST)"


def test_float32_kernel_dots_follow_jax_matmul_precision():
    """Compiled f32 dots follow jax's precision: tf32 (DEFAULT) unless "highest" is asked for."""
    default = _kernel_dot_precisions(interpret=False)
    assert default == {"(Precision.DEFAULT, Precision.DEFAULT)"}, default
    with jax.default_matmul_precision("highest"):
        assert _kernel_dot_precisions(interpret=False) == {HIGHEST}
    with jax.default_matmul_precision("float32"):
        assert _kernel_dot_precisions(interpret=False) == {HIGHEST}
    assert _kernel_dot_precisions(interpret=False, precision="highest") == {HIGHEST}
    # an explicit argument wins over the context
    with jax.default_matmul_precision("highest"):
        assert _kernel_dot_precisions(interpret=False, precision=lax.Precision.DEFAULT) == {
            "(Precision.DEFAULT, Precision.DEFAULT)"}


def test_interpret_mode_keeps_full_precision():
    """The CPU oracle path (interpret mode) asks for IEEE f32 dots: the 1e-5 tolerances."""
    assert _kernel_dot_precisions(interpret=True) == {HIGHEST}


def test_bad_precision_names_the_value():
    q = jnp.zeros((1, 16, 1, 16), jnp.float32)
    with pytest.raises(ValueError, match="precision='tf16'"):
        flash_attention(q, q, q, precision="tf16", interpret=True)
