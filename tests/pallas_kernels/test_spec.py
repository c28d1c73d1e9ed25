"""The contract in ``spec.py``: the elementwise predicate against the rules written out in plain
Python, its interval form against the predicate (exhaustively: the two cannot drift), the segment
block form's soundness, and T5's bucket rule against transformers."""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from jt5.pallas_kernels.spec import (Mask, interval_visible, relative_position_bucket,
                                     segment_blocks, segment_stats, visible)

Q_POS = np.arange(-3, 13)   # negative: a query offset before the sequence start
K_POS = np.arange(0, 13)
MASKS = [Mask(causal=c, local_window=w, num_global_tokens=g, kv_len=n)
         for c, w, g, n in itertools.product((False, True), (None, 0, 2), (0, 1, 3), (None, 4, 11))
         if w is not None or g == 0]


def _rules(q, k, qs, ks, m: Mask) -> bool:
    """The module docstring's conditions, one pair at a time."""
    if ks is not None and (ks == 0 or (qs is not None and qs != ks)):
        return False
    if m.kv_len is not None and k >= m.kv_len:
        return False
    if m.causal and k > q:
        return False
    g = m.num_global_tokens
    return (m.local_window is None or abs(k - q) <= m.local_window
            or (g > 0 and (k < g or q < g)))


def _grid(mask):
    """``visible`` over every (q_pos, k_pos) of the grid, ``[len(Q_POS), len(K_POS)]``."""
    vis = visible(jnp.asarray(Q_POS)[:, None], jnp.asarray(K_POS)[None, :], None, None, mask)
    return np.broadcast_to(True if vis is None else np.asarray(vis), (Q_POS.size, K_POS.size))


def test_visible_follows_the_rules():
    r = np.random.default_rng(0)
    q_seg, k_seg = r.integers(0, 3, Q_POS.size), r.integers(0, 3, K_POS.size)
    for mask, (qs, ks) in itertools.product(MASKS, ((None, None), (None, k_seg), (q_seg, k_seg))):
        got = visible(jnp.asarray(Q_POS)[:, None], jnp.asarray(K_POS)[None, :],
                      None if qs is None else jnp.asarray(qs)[:, None],
                      None if ks is None else jnp.asarray(ks)[None, :], mask)
        got = np.broadcast_to(True if got is None else np.asarray(got), (Q_POS.size, K_POS.size))
        want = np.array([[_rules(q, k, None if qs is None else qs[i], None if ks is None else ks[j],
                                 mask) for j, k in enumerate(K_POS)] for i, q in enumerate(Q_POS)])
        np.testing.assert_array_equal(got, want, err_msg=str((mask, qs is None, ks is None)))


@pytest.mark.parametrize("mask", MASKS, ids=[f"c{int(m.causal)}-w{m.local_window}-"
                                             f"g{m.num_global_tokens}-n{m.kv_len}" for m in MASKS])
def test_interval_form_is_exactly_some_and_every_element(mask):
    """For every pair of position intervals on the grid: ``interval_visible`` == (some pair
    visible, every pair visible) by the elementwise predicate."""
    vis = _grid(mask).astype(np.int64)
    # 2-D prefix sums: the number of visible pairs of any interval pair in O(1)
    c = np.zeros((vis.shape[0] + 1, vis.shape[1] + 1), np.int64)
    c[1:, 1:] = vis.cumsum(0).cumsum(1)
    qi = [(a, b) for a in range(Q_POS.size) for b in range(a, Q_POS.size)]
    ki = [(a, b) for a in range(K_POS.size) for b in range(a, K_POS.size)]
    (qa, qb), (ka, kb) = (np.array(x).T for x in (qi, ki))
    qa, qb, ka, kb = qa[:, None], qb[:, None], ka[None, :], kb[None, :]
    count = c[qb + 1, kb + 1] - c[qa, kb + 1] - c[qb + 1, ka] + c[qa, ka]
    size = (qb - qa + 1) * (kb - ka + 1)
    some, every = interval_visible(jnp.asarray(Q_POS[qa]), jnp.asarray(Q_POS[qb]),
                                   jnp.asarray(K_POS[ka]), jnp.asarray(K_POS[kb]), mask)
    some = np.broadcast_to(np.asarray(some), count.shape)
    every = np.broadcast_to(np.asarray(every), count.shape)
    np.testing.assert_array_equal(some, count > 0)
    np.testing.assert_array_equal(every, count == size)


def test_segment_block_form_is_sound():
    """Every block pair of ids in {0, 1, 2} (length 3): ``some`` never misses a visible pair,
    ``every`` never claims an invisible one, with and without query ids."""
    blocks = np.array(list(itertools.product(range(3), repeat=3)), np.int32)      # [27, 3]
    stats = [np.asarray(x) for x in segment_stats(jnp.asarray(blocks.reshape(1, -1)), 3)]
    q_stats = [x[0][:, None] for x in stats]
    k_stats = [x[0][None, :] for x in stats]
    k_real = blocks != 0                                                            # [27, 3]
    same = (blocks[:, None, :, None] == blocks[None, :, None, :]) & k_real[None, :, None, :]
    for q_side, vis in ((None, np.broadcast_to(k_real[None, :, None, :], same.shape)),
                        (q_stats, same)):
        some, every = (np.broadcast_to(np.asarray(x), (27, 27))
                       for x in segment_blocks(q_side, k_stats))
        assert not np.any(vis.any((2, 3)) & ~some)
        assert not np.any(every & ~vis.all((2, 3)))
        if q_side is None:   # key padding alone is exact
            np.testing.assert_array_equal(some, vis.any((2, 3)))
            np.testing.assert_array_equal(every, vis.all((2, 3)))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (48, 40)])
def test_bucket_rule_matches_transformers(bidirectional, num_buckets, max_distance):
    torch = pytest.importorskip("torch")
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = np.arange(-20000, 20001, dtype=np.int64)
    want = t5.T5Attention._relative_position_bucket(
        torch.as_tensor(rel), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    got = relative_position_bucket(jnp.asarray(rel, jnp.int32), bidirectional=bidirectional,
                                   num_buckets=num_buckets, max_distance=max_distance)
    np.testing.assert_array_equal(np.asarray(got), want)
