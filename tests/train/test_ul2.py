"""train.ul2: T5 span-corruption definitions, sentinel layout, the UL2 denoisers."""
import math

import numpy as np
import pytest

from jt5.train import ul2
from jt5.train.ul2 import (Denoiser, SpecialIds, UL2_MIXTURE, compact, draw_splits, example_lengths,
                           fit_raw_length, make_examples, noise_counts, noise_span_to_sentinel,
                           random_segmentation, random_spans_noise_mask)

EOS = 1
SENTINELS = np.arange(383, 261, -1)            # ByT5 layout: <extra_id_0> = 383, counting down
MODES = {"[R]": 259, "[S]": 260, "[X]": 261}  # the three lowest extra ids
SPECIALS = SpecialIds(EOS, SENTINELS, MODES)


def spans_of(row):
    """(start, length) of each run of True."""
    padded = np.concatenate([[False], row, [False]]).astype(np.int8)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return starts, ends - starts


def reconstruct(inputs, targets):
    """Undo span corruption: each sentinel in ``inputs`` is replaced by what follows it in ``targets``."""
    pieces, current = {}, None
    for t in targets:
        if t in SENTINELS:
            current = int(t)
            pieces[current] = []
        else:
            pieces[current].append(int(t))
    out = []
    for t in inputs:
        out += pieces[int(t)] if t in SENTINELS else [int(t)]
    return out


@pytest.mark.parametrize("rate,mu", [(0.15, 3.0), (0.15, 8.0), (0.5, 3.0), (0.5, 64.0), (0.15, 64.0)])
def test_noise_mask_matches_t5_definitions(rate, mu):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 700, size=400)
    mask = random_spans_noise_mask(lengths, rate, mu, rng)
    noise, spans = noise_counts(lengths, rate, mu)
    for row, n, k, s in zip(mask, lengths, noise, spans):
        assert not row[n:].any()                  # nothing past the length
        assert row[:n].sum() == min(k, n - 1)     # round(n r) clipped to [1, n-1] (n >= 2)
        starts, lens = spans_of(row[:n])
        assert len(starts) == s and (lens >= 1).all()
        assert not row[0]                         # t5: spans alternate, starting with non-noise
    # density and mean span length as defined: round(n r) / n and num_noise / num_spans
    long = np.full(200, 10000)
    m = random_spans_noise_mask(long, rate, mu, rng)
    assert abs(m.mean() - rate) < 1e-4
    lens = np.concatenate([spans_of(r)[1] for r in m])
    assert abs(lens.mean() - round(10000 * rate) / max(round(round(10000 * rate) / mu), 1)) < 1e-9
    assert abs(lens.mean() - mu) / mu < 0.1


def test_random_segmentation_is_uniform_over_compositions():
    rng = np.random.default_rng(1)
    n = 30000
    seg = random_segmentation(np.full(n, 7), np.full(n, 3), rng)  # 15 compositions of 7 into 3 parts
    assert (seg > 0).all() and (seg.sum(1) == 7).all()
    counts = {}
    for row in map(tuple, seg):
        counts[row] = counts.get(row, 0) + 1
    assert len(counts) == math.comb(6, 2)
    freq = np.array(list(counts.values())) / n
    assert np.abs(freq - 1 / 15).max() < 0.006  # ~5 sigma
    mixed = random_segmentation(np.array([5, 9, 2, 40]), np.array([1, 9, 2, 3]), rng)
    assert mixed.shape == (4, 9) and (mixed.sum(1) == [5, 9, 2, 40]).all()
    assert ((mixed > 0).sum(1) == [1, 9, 2, 3]).all()


def test_sentinels_count_down_and_reconstruct():
    tokens = np.arange(100, 130)[None]
    mask = np.zeros((1, 30), bool)
    mask[0, [3, 4, 10, 20, 21, 22]] = True
    inp, ni = noise_span_to_sentinel(tokens, mask, [30], SENTINELS)
    tgt, nt = noise_span_to_sentinel(tokens, ~mask, [30], SENTINELS)
    inp, tgt = inp[0, :ni[0]].tolist(), tgt[0, :nt[0]].tolist()
    assert inp == [100, 101, 102, 383, 105, 106, 107, 108, 109, 382, 111, 112, 113, 114, 115, 116, 117, 118,
                   119, 381, 123, 124, 125, 126, 127, 128, 129]
    assert tgt == [383, 103, 104, 382, 110, 381, 120, 121, 122, 380]
    assert reconstruct(inp, tgt) == tokens[0].tolist()


def test_fit_raw_length():
    r = Denoiser("R", 3.0, 0.15)
    # t5 random_spans_helper: 568 raw tokens -> 512 inputs (with EOS) and 114 targets
    assert fit_raw_length(r, 512, 114, 100, 0) == 568
    assert fit_raw_length(r, 512, 114, 100, 1) == 567  # one mode token
    for d in UL2_MIXTURE:
        for L_in, L_tgt in [(512, 114), (512, 512), (128, 32)]:
            n = fit_raw_length(d, L_in, L_tgt, len(SENTINELS), 1)
            if d.kind == "S":
                assert n == L_in + L_tgt - 3
                continue
            noise, spans = noise_counts(n, d.rate, d.mean_span)
            assert n - noise + spans + 2 <= L_in and noise + spans + 1 <= L_tgt and spans <= len(SENTINELS)
            noise, spans = noise_counts(n + 1, d.rate, d.mean_span)
            assert not (n + 1 - noise + spans + 2 <= L_in and noise + spans + 1 <= L_tgt
                        and spans <= len(SENTINELS))
    # the sentinel budget bounds spans instead of stretching mu
    x = Denoiser("X", 3.0, 0.5)
    assert noise_counts(fit_raw_length(x, 512, 512, 10, 0), 0.5, 3.0)[1] <= 10
    with pytest.raises(ValueError):
        fit_raw_length(r, 3, 2, 100, 1)


def _chunks(rng, mixture, L_in, L_tgt, E):
    which = rng.choice(len(mixture), size=E, p=ul2.mixture_probs(mixture))
    raw = np.array([fit_raw_length(d, L_in, L_tgt, len(SENTINELS), int(d.mode is not None)) for d in mixture])
    lengths = np.minimum(raw[which], rng.integers(2, 2 * raw.max(), size=E))  # some short (doc ends)
    chunks = rng.integers(3, 259, size=(E, int(lengths.max())))
    return chunks, lengths, which


@pytest.mark.parametrize("L_in,L_tgt", [(512, 114), (256, 256)])
def test_make_examples_every_denoiser(L_in, L_tgt):
    rng = np.random.default_rng(2)
    chunks, lengths, which = _chunks(rng, UL2_MIXTURE, L_in, L_tgt, 800)
    splits = draw_splits(lengths, which, UL2_MIXTURE, L_in, L_tgt, rng)
    ex = make_examples(chunks, lengths, which, UL2_MIXTURE, SPECIALS, L_in, L_tgt, rng, splits)
    assert ex.inputs.shape == (800, L_in) and ex.targets.shape == (800, L_tgt)
    assert ex.inputs.dtype == np.int32
    want_in, want_tgt = example_lengths(lengths, which, splits, UL2_MIXTURE)
    assert (ex.inputs_lengths == want_in).all() and (ex.targets_lengths == want_tgt).all()
    seen = set()
    for e in range(len(lengths)):
        d = UL2_MIXTURE[which[e]]
        seen.add(d)
        inp = ex.inputs[e, :ex.inputs_lengths[e]]
        tgt = ex.targets[e, :ex.targets_lengths[e]]
        assert not ex.inputs[e, ex.inputs_lengths[e]:].any() and not ex.targets[e, ex.targets_lengths[e]:].any()
        assert inp[0] == MODES[d.mode] and inp[-1] == EOS and tgt[-1] == EOS  # mode token, EOS
        assert MODES[d.mode] not in inp[1:] and MODES[d.mode] not in tgt
        raw = chunks[e, :lengths[e]].tolist()
        if d.kind == "S":  # prefix-LM: a split of the chunk, no sentinels
            assert inp[1:-1].tolist() + tgt[:-1].tolist() == raw
            assert len(inp) - 2 == splits[e] and not np.isin(inp, SENTINELS).any()
        else:
            sent = inp[np.isin(inp, SENTINELS)]
            assert sent.tolist() == SENTINELS[:len(sent)].tolist()  # count down from the top
            assert tgt[0] == SENTINELS[0]
            assert reconstruct(inp[1:-1], tgt[:-1]) == raw
    assert seen == set(UL2_MIXTURE)


def test_s_denoiser_prefix_lengths_vary_and_fit():
    rng = np.random.default_rng(3)
    s = Denoiser("S", mode="[S]")
    room_in, room_t = 64 - 2, 64 - 1
    n = ul2.prefix_lm_lengths(2000, room_in, room_t, rng)
    assert n.min() == room_t + 1 and n.max() == room_in + room_t == fit_raw_length(s, 64, 64, 10, 1)
    lengths = np.concatenate([n, np.full(500, 10)])  # and short documents
    splits = draw_splits(lengths, np.zeros(len(lengths), int), (s,), 64, 64, rng)
    assert (splits[:2000] == n - room_t).all()             # full target, prefix uniform in [1, room_in]
    assert abs(np.bincount(splits[:2000] - 1).std() / np.bincount(splits[:2000] - 1).mean()) < 0.4
    assert splits[2000:].min() == 1 and splits[2000:].max() == 9  # short chunks: uniform in [1, n-1]


def test_make_examples_rejects_chunks_that_do_not_fit():
    rng = np.random.default_rng(4)
    d = Denoiser("R", 3.0, 0.15, mode="[R]")
    n = fit_raw_length(d, 64, 16, len(SENTINELS), 1)
    chunk = rng.integers(3, 259, size=(1, n + 5))
    with pytest.raises(ValueError, match="too long"):
        make_examples(chunk, [n + 5], [0], (d,), SPECIALS, 64, 16, rng)
    with pytest.raises(ValueError, match="2 tokens"):
        make_examples(chunk, [1], [0], (d,), SPECIALS, 64, 16, rng)


def test_compact_fast_and_ragged_paths_agree():
    rng = np.random.default_rng(5)
    values = rng.integers(0, 1000, size=(6, 9))
    for keep in (rng.random((6, 9)) < 0.5, np.tile(rng.random(9) < 0.5, (6, 1))):
        for offset in (0, 2, np.array([0, 1, 0, 1, 1, 0])):
            out, counts = compact(values, keep, offset, 12)
            offs = np.broadcast_to(offset, 6)
            for b in range(6):
                assert out[b, offs[b]:offs[b] + counts[b]].tolist() == values[b][keep[b]].tolist()
                assert not out[b, :offs[b]].any() and not out[b, offs[b] + counts[b]:].any()


def test_default_mixture_realises_each_denoiser():
    """What the default mixture's examples really contain, measured on the examples: the mode
    token of each denoiser kind in proportion to its probability, and per span-corruption
    denoiser a realised noise density within 0.01 of its r and mean span within 10% of its μ
    (counted from the targets: noise tokens / sentinels). A swapped μ/r, a mode token on the
    wrong kind or weights that do not reach the sampler fail here."""
    rng = np.random.default_rng(5)
    L_in, L_tgt, E = 1024, 1024, 3000
    which = rng.choice(len(UL2_MIXTURE), size=E, p=ul2.mixture_probs(UL2_MIXTURE))
    raw = np.array([fit_raw_length(d, L_in, L_tgt, len(SENTINELS), 1) for d in UL2_MIXTURE])
    lengths = raw[which]  # each denoiser's longest chunk (the sentinels bound the spans)
    chunks = rng.integers(3, 259, size=(E, int(lengths.max())))
    ex = make_examples(chunks, lengths, which, UL2_MIXTURE, SPECIALS, L_in, L_tgt, rng)
    modes = ex.inputs[:, 0]
    for name, mode_id in MODES.items():
        p = sum(q for d, q in zip(UL2_MIXTURE, ul2.mixture_probs(UL2_MIXTURE)) if d.mode == name)
        share = np.mean(modes == mode_id)
        assert abs(share - p) < 4 * math.sqrt(p * (1 - p) / E), (name, share, p)
    for i, d in enumerate(UL2_MIXTURE):
        rows = np.flatnonzero(ex.denoiser == i)
        assert (which[rows] == i).all() and len(rows) > 100
        if d.kind == "S":
            continue
        tgt = ex.targets[rows]
        spans = np.isin(tgt, SENTINELS).sum()
        noise = (ex.targets_lengths[rows] - 1).sum() - spans
        assert abs(noise / lengths[rows].sum() - d.rate) < 0.01, (d, noise / lengths[rows].sum())
        assert abs(noise / spans / d.mean_span - 1) < 0.1, (d, noise / spans)