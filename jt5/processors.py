"""Logits processors inside the compiled generation loop, transformers' semantics and order.

The order is ``GenerationMixin._get_logits_processor``'s: repetition penalty → no-repeat n-grams
→ encoder no-repeat n-grams → bad words → min length / min new tokens → forced BOS → forced EOS
→ exponential decay length penalty → suppress tokens → begin-suppress tokens, then (sampling
only) temperature → top-k → top-p. Greedy and sampling apply them to the raw float32 logits,
beam search to the log-softmax (``_beam_search``), as transformers does.

Each processor reads the token buffer ``seqs [R, L]`` (the decoder start token at column 0,
columns ``0..step`` are what transformers calls ``input_ids``; later columns hold filler and are
masked by position) and works on the whole vocabulary at once: bans are one scatter into a
``[R, V + 1]`` mask whose spare column absorbs the non-matches, so the per-step cost is
``O(R * L * n)`` compares for n-grams, no host round trip and no Python loop over rows.
Whether a processor runs is static (``Static``); its values are traced (``Knobs``).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jt5.generation_config import Resolved


@dataclasses.dataclass(frozen=True)
class Static:
    repetition: bool = False
    ngram: int = 0
    encoder_ngram: int = 0
    bad_words: tuple = (0, 0)    # (number of words, longest prefix); (0, 0) = off
    suppress: bool = False
    begin_suppress: bool = False
    forced_bos: bool = False
    forced_eos: int = 0           # number of forced EOS ids; 0 = off
    decay: bool = False
    do_sample: bool = False
    top_k: int = 0
    use_top_p: bool = False
    min_tokens_to_keep: int = 1


class Knobs(NamedTuple):
    eos: jax.Array              # [n_eos] i32
    eos_ban_steps: jax.Array    # i32: EOS is -inf while step < this (min_length / new tokens)
    repetition_penalty: jax.Array
    bad_prefix: jax.Array       # [W, P] i32, right-aligned
    bad_valid: jax.Array        # [W, P] bool: which prefix slots a word uses
    bad_last: jax.Array         # [W] i32: the token a matching prefix bans
    suppress: jax.Array         # [V] bool (or [0] when off)
    begin_suppress: jax.Array   # [V] bool (or [0])
    begin_step: jax.Array       # i32
    forced_bos: jax.Array       # i32
    forced_eos: jax.Array       # [n] i32
    last_step: jax.Array        # i32: the step at which forced EOS applies (max_length - 1)
    decay_start: jax.Array      # i32
    decay_table: jax.Array      # [max_new_tokens + 1] f32: factor ** k - 1 (float64 on host)
    temperature: jax.Array
    top_p_cut: jax.Array        # tokens with cumulative probability <= 1 - top_p are dropped


def build(r: Resolved, vocab_size: int, *, beam: bool) -> tuple[Static, Knobs]:
    """The static switches and the traced values of a resolved config."""
    n = r.max_new_tokens
    words = r.bad_words
    P = max((len(w) - 1 for w in words), default=0)
    prefix = np.zeros((len(words), P), np.int32)
    valid = np.zeros((len(words), P), bool)
    for w, word in enumerate(words):
        p = len(word) - 1
        prefix[w, P - p:] = word[:-1]
        valid[w, P - p:] = True

    def mask(ids):
        m = np.zeros(vocab_size if ids else 0, bool)
        m[list(ids)] = True
        return m

    decay_start, factor = r.decay if r.decay is not None else (0, 1.0)
    with np.errstate(over="ignore"):
        table = np.float64(factor) ** np.arange(n + 1, dtype=np.float64) - 1.0
    st = Static(repetition=r.repetition_penalty != 1.0, ngram=r.no_repeat_ngram_size,
                encoder_ngram=r.encoder_no_repeat_ngram_size,
                bad_words=(len(words), P) if words else (0, 0),
                suppress=bool(r.suppress_tokens), begin_suppress=bool(r.begin_suppress_tokens),
                forced_bos=r.forced_bos_token_id is not None, forced_eos=len(r.forced_eos),
                decay=r.decay is not None and bool(r.eos), do_sample=r.do_sample,
                top_k=r.top_k if r.do_sample else 0,
                use_top_p=r.do_sample and r.top_p < 1.0,
                # transformers keeps 1 + #eos tokens when beam sampling (a non-EOS continuation)
                min_tokens_to_keep=(1 + len(r.eos)) if beam else 1)
    kn = Knobs(eos=np.asarray(r.eos, np.int32), eos_ban_steps=np.int32(r.eos_ban_steps),
               repetition_penalty=np.float32(r.repetition_penalty),
               bad_prefix=prefix, bad_valid=valid,
               bad_last=np.asarray([w[-1] for w in words], np.int32).reshape(len(words)),
               suppress=mask(r.suppress_tokens), begin_suppress=mask(r.begin_suppress_tokens),
               begin_step=np.int32(r.begin_suppress_step),
               forced_bos=np.int32(r.forced_bos_token_id or 0),
               forced_eos=np.asarray(r.forced_eos, np.int32), last_step=np.int32(n - 1),
               decay_start=np.int32(decay_start), decay_table=table.astype(np.float32),
               temperature=np.float32(r.temperature if r.do_sample else 1.0),
               top_p_cut=np.float32(1.0 - r.top_p))
    return st, kn


def is_eos(tokens, eos):
    if eos.shape[0] == 0:
        return jnp.zeros(tokens.shape, bool)
    return jnp.any(tokens[..., None] == eos, axis=-1)


def _ban(scores, tokens, hit):
    """-inf at ``tokens [R, M]`` where ``hit [R, M]``: one scatter, the spare column V absorbs
    the misses (transformers' NoRepeatNGram trick, so a miss never unbans another hit)."""
    R, V = scores.shape
    rows = jnp.arange(R)[:, None]
    where = jnp.where(hit & (tokens >= 0) & (tokens < V), tokens, V)
    banned = jnp.zeros((R, V + 1), bool).at[rows, where].set(True)[:, :V]
    return jnp.where(banned, -jnp.inf, scores)


def _windows(x, n: int):
    """``x [R, L]`` -> ``[R, L - n + 1, n]``: every length-n window (n static shifted slices)."""
    J = x.shape[1] - n + 1
    return jnp.stack([x[:, k:k + J] for k in range(n)], axis=-1)


def _suffix(seqs, step, m: int):
    """The last ``m`` tokens before the next one: columns ``step + 1 - m .. step`` (clamped)."""
    if m == 0:
        return seqs[:, :0]
    return jax.lax.dynamic_slice_in_dim(seqs, jnp.maximum(step + 1 - m, 0), m, axis=1)


def encoder_windows(input_ids, input_length, n: int, rows_per_input: int):
    """Encoder n-grams for ``EncoderNoRepeatNGramLogitsProcessor``: ``([R, J, n], [R, J])``.

    transformers takes them over the padded ``input_ids`` as given (pads included), so only the
    jt5 bucket padding (columns >= ``input_length``) is excluded."""
    win = _windows(input_ids, n)
    ok = (jnp.arange(win.shape[1]) + n <= input_length)[None].repeat(input_ids.shape[0], 0)
    return jnp.repeat(win, rows_per_input, 0), jnp.repeat(ok, rows_per_input, 0)


def _top_p(scores, cut, keep: int):
    """transformers' ``TopPLogitsWarper``: drop the low tail whose mass is <= 1 - top_p."""
    rows = jnp.arange(scores.shape[0])[:, None]
    order = jnp.argsort(scores, axis=-1)  # ascending
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(scores, order, -1), -1), -1)
    remove = (cum <= cut).at[:, -keep:].set(False)
    remove = jnp.zeros_like(remove).at[rows, order].set(remove)
    return jnp.where(remove, -jnp.inf, scores)


def process(scores, seqs, step, kn: Knobs, st: Static, enc=None):
    """Processors of one step: ``scores [R, V]`` float32 for the token after column ``step`` of
    ``seqs [R, L]``. ``enc``: ``encoder_windows(...)`` when ``st.encoder_ngram``."""
    R, V = scores.shape
    L = seqs.shape[1]
    cur_len = step + 1  # transformers' input_ids.shape[-1] (the start token counts)
    pos = jnp.arange(L)
    eos_col = is_eos(jnp.arange(V), kn.eos)[None]
    if st.repetition:  # RepetitionPenaltyLogitsProcessor: each seen token once, sign-aware
        present = jnp.zeros((R, V + 1), bool).at[
            jnp.arange(R)[:, None],
            jnp.where((pos <= step)[None] & (seqs >= 0) & (seqs < V), seqs, V)].set(True)[:, :V]
        p = kn.repetition_penalty
        scores = jnp.where(present, jnp.where(scores < 0, scores * p, scores / p), scores)
    if st.ngram:  # NoRepeatNGramLogitsProcessor: windows starting with the current suffix
        n = st.ngram
        win = _windows(seqs, n)
        hit = jnp.all(win[..., :-1] == _suffix(seqs, step, n - 1)[:, None], -1)
        hit &= (jnp.arange(win.shape[1]) + n - 1 <= step)[None] & (cur_len >= n)
        scores = _ban(scores, win[..., -1], hit)
    if st.encoder_ngram:  # EncoderNoRepeatNGramLogitsProcessor: the prompt's n-grams
        n = st.encoder_ngram
        win, ok = enc
        hit = jnp.all(win[..., :-1] == _suffix(seqs, step, n - 1)[:, None], -1) & ok
        scores = _ban(scores, win[..., -1], hit & (cur_len >= n - 1))
    if st.bad_words[0]:  # NoBadWordsLogitsProcessor: a word whose prefix ends the sequence
        P = st.bad_words[1]
        at = step + 1 - P + jnp.arange(P)
        ctx = jnp.take_along_axis(seqs, jnp.clip(at, 0, L - 1)[None].repeat(R, 0), 1)
        same = (ctx[:, None] == kn.bad_prefix[None]) & (at >= 0)[None, None]
        hit = jnp.all(same | ~kn.bad_valid[None], -1)  # [R, W]
        scores = _ban(scores, jnp.broadcast_to(kn.bad_last[None], hit.shape), hit)
    # MinLength / MinNewTokensLength (both EOS masks up to the same step for encoder-decoders)
    scores = jnp.where(eos_col & (step < kn.eos_ban_steps), -jnp.inf, scores)
    if st.forced_bos:  # ForcedBOSTokenLogitsProcessor: the first new token
        forced = jnp.where(jnp.arange(V) == kn.forced_bos, 0.0, -jnp.inf)[None]
        scores = jnp.where(step == 0, forced, scores)
    if st.forced_eos:  # ForcedEOSTokenLogitsProcessor: at max_length - 1
        forced = jnp.where(is_eos(jnp.arange(V), kn.forced_eos), 0.0, -jnp.inf)[None]
        scores = jnp.where(step == kn.last_step, forced, scores)
    if st.decay:  # ExponentialDecayLengthPenalty: EOS gains |score| * (factor ** k - 1)
        k = step - kn.decay_start
        grow = kn.decay_table[jnp.clip(k, 0, kn.decay_table.shape[0] - 1)]
        bonus = jnp.where(jnp.isfinite(scores), jnp.abs(scores) * grow, 0.0)
        scores = jnp.where(eos_col & (k > 0), scores + bonus, scores)
    if st.suppress:
        scores = jnp.where(kn.suppress[None], -jnp.inf, scores)
    if st.begin_suppress:
        scores = jnp.where(kn.begin_suppress[None] & (step == kn.begin_step), -jnp.inf, scores)
    if st.do_sample:
        scores = scores / kn.temperature
        if st.top_k:
            kk = min(max(st.top_k, st.min_tokens_to_keep), V)
            kth = jax.lax.top_k(scores, kk)[0][:, -1:]
            scores = jnp.where(scores < kth, -jnp.inf, scores)
        if st.use_top_p:
            scores = _top_p(scores, kn.top_p_cut, st.min_tokens_to_keep)
    return scores
