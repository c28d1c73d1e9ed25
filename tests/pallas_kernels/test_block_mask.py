"""block_mask classification against a brute-force dense mask (reference.dense_mask).

Geometry kwargs ``q_offset`` and the Mask fields are flat dicts here; ``_spec`` splits them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels.block_mask import classify_blocks, make_block_mask, tables_from_classes
from jt5.pallas_kernels.reference import dense_mask
from jt5.pallas_kernels.spec import Mask


def _spec(kw):
    """(Mask, q_offset) from a flat keyword dict."""
    kw = dict(kw)
    q_offset = kw.pop("q_offset", 0)
    return Mask(**kw), q_offset


def _classify(T, S, bq, bk, **kw):
    mask, q_offset = _spec(kw)
    return classify_blocks(mask, q_len=T, kv_len=S, block_q=bq, block_k=bk, q_offset=q_offset)


def _dense_blocks(T, S, bq, bk, kv_valid_len=None, **kw):
    """(any visible, all visible) per block pair from the dense ``[B, T, S]`` visibility."""
    mask, q_offset = _spec(kw)
    m = dense_mask(mask, q_len=T, kv_len=S, q_offset=q_offset)
    m = np.ones((1, T, S), bool) if m is None else np.asarray(m)[:, 0]
    m = np.broadcast_to(m, (m.shape[0], T, S)).copy()
    if kv_valid_len is not None:  # brute force, independent of Mask.kv_len
        m[:, :, kv_valid_len:] = False
    blocks = m.reshape(m.shape[0], T // bq, bq, S // bk, bk)
    return blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))


def _random_segments(rng, B, L, max_segments=4, pad=True):
    ids = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), size=max_segments - 1, replace=False))
        seg = np.searchsorted(cuts, np.arange(L), side="right") + 1
        if pad:
            seg[L - rng.integers(0, L // 3):] = 0
        ids[b] = seg
    return ids


def _check(live, full, any_vis, all_vis, exact=False):
    live, full = np.asarray(live), np.asarray(full)
    live, full = np.broadcast_to(live, any_vis.shape), np.broadcast_to(full, all_vis.shape)
    assert not np.any(any_vis & ~live), "a block with a visible pair was skipped"
    assert not np.any(full & ~all_vis), "a block marked full has an invisible pair"
    assert not np.any(full & ~live)
    if exact:
        np.testing.assert_array_equal(live, any_vis)
        np.testing.assert_array_equal(full, all_vis)


GEOMETRY = [
    dict(causal=True),
    dict(causal=True, q_offset=45),
    dict(local_window=20),
    dict(local_window=50, num_global_tokens=7),
    dict(local_window=10, num_global_tokens=40, q_offset=13),
    dict(causal=True, local_window=30, q_offset=-9),
]


@pytest.mark.parametrize("kw", GEOMETRY, ids=[str(i) for i in range(len(GEOMETRY))])
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 16), (16, 64)])
def test_geometry_classification_is_exact(kw, bq, bk):
    T, S = 128, 192
    live, full = _classify(T, S, bq, bk, **kw)
    any_vis, all_vis = _dense_blocks(T, S, bq, bk, **kw)
    _check(live, full, any_vis, all_vis, exact=True)


@pytest.mark.parametrize("seed", range(6))
def test_segments_and_geometry_are_conservative(seed):
    rng = np.random.default_rng(seed)
    B, T, S, bq, bk = 3, 128, 96, 16, 32
    kv = _random_segments(rng, B, S)
    q = _random_segments(rng, B, T) if seed % 2 else None
    geo = GEOMETRY[seed % len(GEOMETRY)] if seed % 3 else {}
    valid = S - 10 if seed == 4 else None
    kw = dict(q_segment_ids=None if q is None else jnp.asarray(q),
              kv_segment_ids=jnp.asarray(kv), **geo)
    live, full = _classify(T, S, bq, bk, kv_len=valid, **kw)
    any_vis, all_vis = _dense_blocks(T, S, bq, bk, kv_valid_len=valid, **kw)
    _check(live, full, any_vis, all_vis)
    # Sorted contiguous packing without geometry: the range test is exact for liveness.
    if not geo and q is not None:
        np.testing.assert_array_equal(np.asarray(live), any_vis)


def test_key_padding_without_segment_ids():
    live, full = _classify(64, 128, 32, 32, kv_len=70)
    any_vis, all_vis = _dense_blocks(64, 128, 32, 32, kv_valid_len=70)
    _check(live, full, any_vis, all_vis, exact=True)
    assert np.asarray(live).shape == (1, 2, 4)       # no segment ids: one table for all rows


def test_causal_visits_about_half_the_blocks():
    n = 32
    bm = make_block_mask(Mask(causal=True), q_len=n * 32, kv_len=n * 32, block_q=32, block_k=32)
    counts = np.asarray(bm.counts)
    assert counts.shape == (1, n, 2)
    assert counts[..., 1].sum() == n * (n + 1) // 2      # lower triangle incl. diagonal
    assert counts[..., 0].sum() == n * (n - 1) // 2      # strictly below the diagonal: full
    assert abs(counts[..., 1].sum() / n**2 - 0.5) < 0.02


def test_tables_list_full_then_partial_then_repeat_last():
    rng = np.random.default_rng(7)
    kv = _random_segments(rng, 2, 128)
    q = _random_segments(rng, 2, 64)
    live, full = _classify(64, 128, 16, 16, q_segment_ids=jnp.asarray(q),
                           kv_segment_ids=jnp.asarray(kv), causal=True, q_offset=64)
    for transpose in (False, True):
        bm = tables_from_classes(live, full, transpose=transpose)
        lv, fl = np.asarray(live), np.asarray(full)
        if transpose:
            lv, fl = lv.swapaxes(1, 2), fl.swapaxes(1, 2)
        counts, idx = np.asarray(bm.counts), np.asarray(bm.indices)
        for b in range(lv.shape[0]):
            for r in range(lv.shape[1]):
                n_full, n_live = counts[b, r]
                assert list(idx[b, r, :n_full]) == list(np.flatnonzero(fl[b, r]))
                partial = np.flatnonzero(lv[b, r] & ~fl[b, r])
                assert list(idx[b, r, n_full:n_live]) == list(partial)
                tail = idx[b, r, n_live:]
                assert np.all(tail == (idx[b, r, n_live - 1] if n_live else 0))


def test_jittable_with_traced_segment_ids_and_offset():
    rng = np.random.default_rng(3)
    q, kv = _random_segments(rng, 2, 64), _random_segments(rng, 2, 96)

    @jax.jit
    def tables(q, kv, off):
        return make_block_mask(Mask(q_segment_ids=q, kv_segment_ids=kv, causal=True), q_len=64,
                               kv_len=96, block_q=16, block_k=32, q_offset=off, transpose=True)

    got = tables(jnp.asarray(q), jnp.asarray(kv), jnp.int32(20))
    want = make_block_mask(Mask(q_segment_ids=q, kv_segment_ids=kv, causal=True), q_len=64,
                           kv_len=96, block_q=16, block_k=32, q_offset=20, transpose=True)
    np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    assert got.counts.shape == (2, 3, 2) and got.indices.shape == (2, 3, 4)


def test_rejects_non_multiple_lengths():
    with pytest.raises(ValueError, match="must be a multiple of"):
        classify_blocks(Mask(), q_len=100, kv_len=128, block_q=32, block_k=32)
