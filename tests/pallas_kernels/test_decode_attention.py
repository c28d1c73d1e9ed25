"""decode_attention (Pallas interpret mode on CPU) against reference.attention_reference with a
single query row; its CUDA (Triton) lowering on CPU; and the whole model's ``decode_step`` with
``attention="pallas"`` against ``attention="xla"``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels.blocks import DecodeBlockSizes
from jt5.pallas_kernels.decode_attention import decode_attention, kv_bytes, live_length
from jt5.pallas_kernels.reference import attention_reference
from jt5.pallas_kernels.spec import Mask, RelativeBias
from tests.conftest import assert_close

N = 3


def _inputs(B, S, H, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = (0.5 * jax.random.normal(ks[0], (B, 1, N, H))).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, N, H)).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, N, H)).astype(dtype)
    table = 2.0 * jax.random.normal(ks[3], (32, N), jnp.float32)
    return q, k, v, table


def _padding(B, S):
    """Key padding; batch row 0 sees nothing (-> zeros), row 1 a prefix."""
    seg = np.ones((B, S), np.int32)
    seg[0] = 0
    seg[1, S // 3:] = 0
    return jnp.asarray(seg)


# (S, H, block_k, splits): lengths that are / are not block multiples, H not a power of two
SHAPES = [(128, 64, 32, 3), (200, 64, 64, 2), (77, 10, 16, None), (48, 32, 128, 4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("S,H,block_k,splits", SHAPES, ids=[f"S{s}-H{h}-bk{b}-p{p}"
                                                             for s, h, b, p in SHAPES])
def test_causal_self_attention_with_bias(dtype, S, H, block_k, splits):
    """Decoder self-attention: unidirectional bias, keys after the query masked (q_offset)."""
    B = 2
    q, k, v, table = _inputs(B, S, H, dtype)
    bs = DecodeBlockSizes(block_k=block_k, num_splits=splits)
    mask = Mask(causal=True)
    fn = jax.jit(lambda q, k, v, t, pos: decode_attention(
        q, k, v, mask, RelativeBias(t, bidirectional=False, max_distance=24), q_offset=pos,
        block_sizes=bs))
    for pos in sorted({0, 1, block_k - 1, block_k, S // 2, S - 1}):
        if pos >= S:
            continue
        out = fn(q, k, v, table, jnp.int32(pos))   # a traced position: one compilation
        ref = attention_reference(q, k, v, mask,
                                  RelativeBias(table, bidirectional=False, max_distance=24),
                                  q_offset=pos)
        assert_close(out, ref, dtype=dtype, check="attention", what=f"q_offset={pos}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_attention_padding_no_bias(dtype):
    """Cross-attention: encoder padding masked, no bias; a fully padded row gives zeros."""
    B, S, H = 3, 96, 64
    q, k, v, _ = _inputs(B, S, H, dtype, seed=1)
    mask = Mask(kv_segment_ids=_padding(B, S))
    out = decode_attention(q, k, v, mask, block_sizes=DecodeBlockSizes(block_k=32, num_splits=2))
    ref = attention_reference(q, k, v, mask)
    assert_close(out, ref, dtype=dtype, check="attention", what="cross-attention")
    assert not np.asarray(out[0], np.float32).any()


def test_bidirectional_bias_packing_and_scale():
    """The rest of the contract: bidirectional buckets, q/kv segment ids, sm_scale, q_offset
    inside a non-causal row, a local window with global tokens."""
    B, S, H = 2, 64, 16
    q, k, v, table = _inputs(B, S, H, "float32", seed=2)
    kv_seg = jnp.asarray(np.repeat(np.array([[1] * 20 + [2] * 40 + [0] * 4]), B, 0))
    q_seg = jnp.asarray([[2], [1]], jnp.int32)
    bias = RelativeBias(table, bidirectional=True, max_distance=24)
    for mask in (Mask(q_segment_ids=q_seg, kv_segment_ids=kv_seg),
                 Mask(kv_segment_ids=kv_seg, local_window=6, num_global_tokens=3)):
        out = decode_attention(q, k, v, mask, bias, q_offset=30, sm_scale=0.7,
                               block_sizes=DecodeBlockSizes(block_k=16))
        ref = attention_reference(q, k, v, mask, bias, q_offset=30, sm_scale=0.7)
        assert_close(out, ref, dtype="float32", check="attention", what=str(mask.patterns))


@pytest.mark.slow
def test_gradient_uses_the_reference():
    B, S, H = 1, 32, 16
    q, k, v, table = _inputs(B, S, H, "float32", seed=3)
    def loss(f):
        return lambda q, k, v, t: jnp.sum(f(q, k, v, Mask(causal=True), RelativeBias(
            t, bidirectional=False, max_distance=24), q_offset=9) ** 2)
    g = jax.grad(loss(decode_attention), argnums=(0, 1, 2, 3))(q, k, v, table)
    r = jax.grad(loss(attention_reference), argnums=(0, 1, 2, 3))(q, k, v, table)
    for a, b in zip(g, r):
        assert_close(a, b, dtype="float32", check="attention_grad", what="grad")


def test_bad_arguments():
    q, k, v, table = _inputs(1, 32, 16, "float32")
    with pytest.raises(ValueError, match="q_len=2 must be 1"):
        decode_attention(jnp.concatenate([q, q], 1), k, v)
    with pytest.raises(ValueError, match="block_k=24"):
        decode_attention(q, k, v, block_sizes=DecodeBlockSizes(block_k=24))
    with pytest.raises(ValueError, match="num_buckets"):
        decode_attention(q, k, v, None, RelativeBias(table[:, :2]))
    with pytest.raises(ValueError, match="share a dtype"):
        decode_attention(q.astype(jnp.bfloat16), k, v)


def test_bytes_and_live_length():
    assert kv_bytes(batch=2, num_heads=8, head_dim=64, live_len=128, dtype="bfloat16") == \
        2 * 2 * 8 * 128 * 64 * 2
    assert live_length(256, causal=True, q_pos=0, block_k=64) == 64
    assert live_length(256, causal=True, q_pos=130, block_k=64) == 192
    assert live_length(192, causal=False, q_pos=0, block_k=128) == 192  # blocks of 64
    assert live_length(200, causal=False, q_pos=0, block_k=64) == 256  # padded to whole blocks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("H", [64, 128])
def test_lowers_to_triton_for_cuda(dtype, H):
    """The real Pallas -> Triton lowering, on a CPU machine (catches what interpret hides)."""
    B, S, heads = 4, 384, 8
    q = jnp.zeros((B, 1, heads, H), dtype)
    k = jnp.zeros((B, S, heads, H), dtype)
    table = jnp.zeros((32, heads), jnp.float32)
    seg = jnp.ones((B, S), jnp.int32)

    def self_attn(q, k, v, t, pos):
        return decode_attention(q, k, v, Mask(causal=True), RelativeBias(t, bidirectional=False),
                                q_offset=pos, interpret=False,
                                block_sizes=DecodeBlockSizes(num_splits=4))

    def cross_attn(q, k, v, seg):
        return decode_attention(q, k, v, Mask(kv_segment_ids=seg), interpret=False)

    def packed_padded(q, k, v, t, q_seg, seg):  # S=100: padded to whole tiles in the wrapper
        return decode_attention(q, k[:, :100], v[:, :100],
                                Mask(q_segment_ids=q_seg, kv_segment_ids=seg[:, :100]),
                                RelativeBias(t), q_offset=3, interpret=False)

    q_seg = jnp.ones((B, 1), jnp.int32)
    for fn, args in ((self_attn, (q, k, k, table, jnp.int32(7))), (cross_attn, (q, k, k, seg)),
                     (packed_padded, (q, k, k, table, q_seg, seg))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text and "t5_flash_decode" in text


def test_model_decode_step_pallas_matches_xla(tmp_path):
    """Whole model: cached decode steps with the kernel equal the XLA path (UMT5: a bias table
    per layer; encoder padding in the cross-attention)."""
    pytest.importorskip("transformers")
    from flax import nnx

    import jt5
    from tests import hf_models

    hf_models.build("umt5", tmp_path)
    xla = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="xla")
    pallas = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="pallas")
    ids, mask, dec = hf_models.inputs(xla.config.vocab_size, batch=2, enc_len=32, dec_len=7)
    encoded = nnx.jit(lambda m, i, a: m.encode(i, a))(xla, jnp.asarray(ids), jnp.asarray(mask))

    @nnx.jit
    def steps(model, encoded, mask, dec):
        cache = model.init_cache(encoded, mask, max_length=20)  # not a block multiple
        outs = []
        for i in range(dec.shape[1]):
            logits, cache = model.decode_step(dec[:, i:i + 1], cache, jnp.int32(i))
            outs.append(logits[:, 0])
        return jnp.stack(outs, 1)

    args = (encoded, jnp.asarray(mask), jnp.asarray(dec))
    assert_close(steps(pallas, *args), steps(xla, *args), dtype="float32", check="logits",
                 what="decode_step pallas vs xla")
