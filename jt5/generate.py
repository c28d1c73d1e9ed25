"""Generation — greedy, sampling and beam search — each in one compiled ``lax.while_loop``.

    ids = generate(model, input_ids, attention_mask, max_new_tokens=64, num_beams=4)

One jitted program runs the encoder once, computes every layer's cross-attention K/V once
(``init_cache``), then loops ``decode_step`` over a preallocated self-attention cache written in
place, with the relative bias of the current position only; the loop stops as soon as every row
(every batch item, for beams) is finished. No host round trip per token.

Output layout is transformers' ``generate`` for encoder-decoder models: column 0 the decoder
start token, ``[B * num_return_sequences, 1 + n]`` with ``n`` the number of steps transformers
would have taken; greedy/sampled rows that finished early are padded with the pad id, finished
beam hypotheses with transformers' beam fill value (``pad_token_id or eos_token_id`` — the eos
id for T5, whose pad id is 0). ``generate_fixed`` returns the untrimmed
``[B * R, 1 + max_new_tokens]`` array and the width as device arrays (no host sync).

What compiles: one program per distinct
  - model graph (architecture, dtypes, attention impl — weights are arguments: new weights of
    the same shapes reuse the program),
  - batch size B and input length *bucket* (``bucket_length``: 16, 32, 64, then multiples of
    32 up to 512, then of 64 — inputs are right-padded to it, so requests of similar length
    share code),
  - max_new_tokens, strategy (greedy / sample / beam / beam-sample), num_beams,
    num_return_sequences, top_k, whether top_p < 1, early_stopping, the number of EOS ids,
    and which logits processors are on (their n-gram sizes, the bad-words table's shape);
    ``jt5.generation_config.FIELDS`` marks every option static or traced.
Traced (changing them never recompiles): the token ids and mask, temperature, top_p,
length_penalty, min_length / min_new_tokens, seed, the eos / pad / decoder-start ids, and the
processors' values: repetition_penalty, the bad words, suppressed tokens, forced BOS/EOS ids,
the exponential decay (start, factor).

Options come from a ``GenerationConfig`` (``resolve_config``: explicit arguments > the model's
checkpoint defaults, ``model.generation_config`` > transformers' defaults), with transformers'
length semantics (``max_length`` counts the decoder start token; 20 new tokens when nothing is
set). Semantics follow transformers 5.x (``GenerationMixin._sample`` / ``_beam_search``): the
logits processors of ``jt5.processors`` in ``_get_logits_processor``'s order, then temperature
→ top-k → top-p (min_tokens_to_keep 1, or 1 + #eos for beam sampling); beam search keeps
``max(2, 1 + #eos) * num_beams`` candidates per step, scores finished hypotheses as
``sum_logprobs / generated_len ** length_penalty`` and
stops a batch item by the same ``early_stopping`` heuristics (True / False / "never").
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jt5 import processors, sharding
from jt5.attention_ops import resolve_impl
from jt5.generation_config import GenerationConfig, Resolved, check_names

_NEG = -1.0e9  # transformers' "impossible" score for beams (finite, so sums stay ordered)
_TRACES = [0]


def trace_count() -> int:
    """How many times a generation program has been traced (tests: no retrace per call)."""
    return _TRACES[0]


def bucket_length(n: int) -> int:
    """Input length bucket: powers of two from 16 to 64, then multiples of 32 up to 512, then
    of 64. Coarser buckets cost real time: on t5-small (CPU, greedy, 32 new tokens) a
    129-token input padded to 256 took 1.41x the time of 128 tokens, padded to 160 1.13x
    (the Pallas kernels pad to whole tiles internally, so any bucket is valid there)."""
    n = int(n)
    if n <= 64:
        return max(16, 1 << max(0, n - 1).bit_length())
    step = 32 if n <= 512 else 64
    return -(-n // step) * step


class GenerateOutput(NamedTuple):
    sequences: jax.Array  # [B * R, 1 + max_new_tokens] int32, column 0 = decoder start
    length: jax.Array     # [] int32: the columns transformers would return


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that shapes the compiled program (hashable: a static jit argument)."""
    beam: bool
    max_new_tokens: int
    cache_length: int
    num_beams: int
    num_return_sequences: int
    early_stopping: bool | str
    proc: processors.Static


class _Knobs(NamedTuple):
    """Traced generation parameters."""
    proc: processors.Knobs
    never_long: jax.Array     # bool: early_stopping == "never" and length_penalty > 0
    denominators: jax.Array   # [max_new_tokens + 2] f32: n ** length_penalty
    pad: jax.Array            # i32
    start: jax.Array          # i32
    fill: jax.Array           # i32: beam hypotheses' filler
    input_length: jax.Array   # i32: the prompt width before bucket padding
    key: jax.Array            # PRNG key


# -------------------------------------------------------------------------------- the loops

def _greedy_or_sample(model, cache, kn: _Knobs, st: _Static, rows: int,
                      enc) -> GenerateOutput:
    n = st.max_new_tokens
    seqs = jnp.full((rows, 1 + n), kn.pad, jnp.int32).at[:, 0].set(kn.start)

    def cond(c):
        i, _, done, _ = c
        return (i < n) & ~jnp.all(done)

    def body(c):
        i, seqs, done, cache = c
        tok = jax.lax.dynamic_slice_in_dim(seqs, i, 1, axis=1)
        logits, cache = model.decode_step(tok, cache, i)
        scores = processors.process(logits[:, 0], seqs, i, kn.proc, st.proc, enc)
        if st.proc.do_sample:
            nxt = jax.random.categorical(jax.random.fold_in(kn.key, i), scores, axis=-1)
        else:
            nxt = jnp.argmax(scores, axis=-1)
        nxt = jnp.where(done, kn.pad, nxt).astype(jnp.int32)   # finished rows get pad
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, nxt[:, None], i + 1, axis=1)
        return i + 1, seqs, done | processors.is_eos(nxt, kn.proc.eos), cache

    i, seqs, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), seqs, jnp.zeros(rows, bool),
                                                    cache))
    return GenerateOutput(seqs, 1 + i)


def _take(x, idx):
    """``x [B, M, ...]`` rows ``idx [B, K]`` along axis 1."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


class _Beams(NamedTuple):
    i: jax.Array               # tokens generated so far
    running: jax.Array         # [B, K, L] live hypotheses
    run_scores: jax.Array      # [B, K] their summed log-probs
    finished: jax.Array        # [B, K, L] the best finished hypotheses
    fin_scores: jax.Array      # [B, K] length-penalised
    fin_flag: jax.Array        # [B, K] slot holds a finished hypothesis
    fin_len: jax.Array         # [B, K] generated tokens of it (incl. EOS)
    improvable: jax.Array      # [B, 1] the early-stop heuristic is not yet satisfied
    all_hit: jax.Array         # [] every candidate of the last step hit a stopping criterion
    cache: object


def _beam_search(model, cache, kn: _Knobs, st: _Static, batch: int, enc) -> GenerateOutput:
    """transformers' vectorised ``_beam_search`` (v4.50+), step for step, in one while_loop."""
    B, K, n = batch, st.num_beams, st.max_new_tokens
    n_eos = kn.proc.eos.shape[0]
    K2 = max(2, 1 + n_eos) * K               # candidates kept per step
    top_mask = jnp.arange(K2) < K            # only the first K may become finished hypotheses
    running = jnp.full((B, K, 1 + n), kn.fill, jnp.int32).at[:, :, 0].set(kn.start)
    early_true = st.early_stopping is True

    def cond(s: _Beams):
        go = jnp.any(s.improvable) & ~s.all_hit & (s.i < n)
        if early_true:
            go &= ~jnp.all(s.fin_flag)
        return go

    def body(s: _Beams) -> _Beams:
        i = s.i
        tok = s.running[:, :, i].reshape(B * K, 1)
        logits, cache = model.decode_step(tok, s.cache, i)
        logp = processors.process(jax.nn.log_softmax(logits[:, 0], axis=-1),
                                  s.running.reshape(B * K, 1 + n), i, kn.proc, st.proc, enc)
        V = logp.shape[-1]
        acc = (logp.reshape(B, K, V) + s.run_scores[:, :, None]).reshape(B, K * V)
        if st.proc.do_sample:  # multinomial without replacement == Gumbel top-k, in sampling order
            g = jax.random.gumbel(jax.random.fold_in(kn.key, i), acc.shape)
            idx = jax.lax.top_k(acc + g, K2)[1]
            top_lp = jnp.take_along_axis(acc, idx, axis=1)
        else:
            top_lp, idx = jax.lax.top_k(acc, K2)
        src, new_tok = idx // V, (idx % V).astype(jnp.int32)
        cand = jax.lax.dynamic_update_slice_in_dim(_take(s.running, src), new_tok[:, :, None],
                                                   i + 1, axis=2)
        hits = processors.is_eos(new_tok, kn.proc.eos) | (i + 1 >= n)   # EOS or max length

        # e. the best K candidates that did not finish continue
        run_lp = top_lp + hits.astype(jnp.float32) * _NEG
        nxt = jax.lax.top_k(run_lp, K)[1]
        running, run_scores, src_next = _take(cand, nxt), _take(run_lp, nxt), _take(src, nxt)

        # f. finished candidates among the first K compete with the kept hypotheses
        did = hits & top_mask[None]
        fin_lp = top_lp / kn.denominators[i + 1]
        if early_true:
            fin_lp = fin_lp + jnp.all(s.fin_flag, -1, keepdims=True).astype(jnp.float32) * _NEG
        fin_lp = fin_lp + (~s.improvable).astype(jnp.float32) * _NEG
        fin_lp = fin_lp + (~did).astype(jnp.float32) * _NEG
        keep = jax.lax.top_k(jnp.concatenate([s.fin_scores, fin_lp], 1), K)[1]
        finished = _take(jnp.concatenate([s.finished, cand], 1), keep)
        fin_scores = _take(jnp.concatenate([s.fin_scores, fin_lp], 1), keep)
        fin_flag = _take(jnp.concatenate([s.fin_flag, did], 1), keep)
        fin_len = _take(jnp.concatenate([s.fin_len, jnp.full((B, K2), i + 1, jnp.int32)], 1),
                        keep)

        # g. reorder the self-attention cache (cross K/V are per input, shared by its beams)
        rows = (jnp.arange(B)[:, None] * K + src_next).reshape(-1)
        cache = cache.reorder(rows)

        # can a running beam still beat the worst kept hypothesis? (_check_early_stop_heuristic)
        best_len = jnp.where(kn.never_long, n, i + 1)
        best_running = run_scores[:, :1] / kn.denominators[best_len]
        worst = jnp.where(fin_flag, jnp.min(fin_scores, 1, keepdims=True), _NEG)
        improvable = s.improvable & jnp.any(best_running > worst, -1, keepdims=True)
        return _Beams(i + 1, running, run_scores, finished, fin_scores, fin_flag, fin_len,
                      improvable, jnp.all(hits), cache)

    init = _Beams(jnp.int32(0), running,
                  jnp.zeros((B, K), jnp.float32).at[:, 1:].set(_NEG), running,
                  jnp.full((B, K), _NEG, jnp.float32), jnp.zeros((B, K), bool),
                  jnp.zeros((B, K), jnp.int32), jnp.ones((B, 1), bool), jnp.bool_(False), cache)
    s = jax.lax.while_loop(cond, body, init)
    R = st.num_return_sequences
    seqs = s.finished[:, :R].reshape(B * R, 1 + n)
    return GenerateOutput(seqs, 1 + jnp.max(s.fin_len[:, :R]))


def _run(graphdef, st: _Static, state, input_ids, attention_mask, kn: _Knobs) -> GenerateOutput:
    _TRACES[0] += 1  # runs only while tracing
    model = nnx.merge(graphdef, state)
    B = input_ids.shape[0]
    encoded = model.encode(input_ids, attention_mask)
    # transformers expands after the encoder: rows b*E .. b*E+E-1 decode input b; the cache
    # keeps one copy of each input's cross K/V for its E rows.
    expand = st.num_beams if st.beam else st.num_return_sequences
    cache = model.init_cache(encoded, attention_mask, max_length=st.cache_length,
                             rows_per_input=expand)
    enc = None
    if st.proc.encoder_ngram:
        enc = processors.encoder_windows(input_ids, kn.input_length, st.proc.encoder_ngram, expand)
    if st.beam:
        return _beam_search(model, cache, kn, st, B, enc)
    return _greedy_or_sample(model, cache, kn, st, B * expand, enc)


_compiled = jax.jit(_run, static_argnums=(0, 1))


# -------------------------------------------------------------------------------- public API

def resolve_config(model, generation_config: GenerationConfig | None = None,
                   **kwargs) -> Resolved:
    """transformers' precedence: ``kwargs`` > ``generation_config`` > the model's
    ``generation_config`` (read from its checkpoint by the loader) > transformers' defaults."""
    check_names(kwargs)
    base = getattr(model, "generation_config", None) or GenerationConfig()
    if generation_config is not None:
        base = base.merged(generation_config)
    return base.replace(**kwargs).resolve(model.config)


def _prepare(model, input_ids, attention_mask, r: Resolved):
    cfg = model.config
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with both > 0, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    pad, eos, n = r.pad, r.eos, r.max_new_tokens
    B, S = ids.shape
    if attention_mask is None:  # transformers: mask pads only if the pad id occurs (and != eos)
        mask = (ids != pad) if (pad in ids and pad not in eos) else np.ones_like(ids)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    Sb = bucket_length(S)
    ids_b = np.full((B, Sb), pad, np.int32)
    ids_b[:, :S] = ids
    mask_b = np.zeros((B, Sb), np.int32)
    mask_b[:, :S] = mask != 0

    beam = r.num_beams > 1
    cache_length = n
    if resolve_impl(cfg.attention) in ("pallas", "mosaic"):  # both decode on the Triton kernel:
        # whole tiles, no padding copy per step
        cache_length = -(-n // 16) * 16
    proc_st, proc_kn = processors.build(r, cfg.vocab_size, beam=beam)
    st = _Static(beam=beam, max_new_tokens=n, cache_length=cache_length,
                 num_beams=r.num_beams, num_return_sequences=r.num_return_sequences,
                 early_stopping=r.early_stopping if beam else False, proc=proc_st)
    with np.errstate(divide="ignore"):  # index 0 is never used
        den = np.arange(n + 2, dtype=np.float64) ** float(r.length_penalty)
    den[0] = 1.0
    kn = _Knobs(proc=proc_kn,
                never_long=np.bool_(r.early_stopping == "never" and r.length_penalty > 0.0),
                denominators=den.astype(np.float32), pad=np.int32(pad), start=np.int32(r.start),
                # transformers' beam filler: ``pad_token_id or eos_token_id[0] if eos else -1``
                fill=np.int32((pad or eos[0]) if eos else -1), input_length=np.int32(S),
                key=jax.random.key(int(r.seed)))
    return st, ids_b, mask_b, kn


def generate_fixed(model, input_ids, attention_mask=None,
                   generation_config: GenerationConfig | None = None, *, mesh=None,
                   **kwargs) -> GenerateOutput:
    """``generate`` without the host-side trim: fixed-shape device arrays, no synchronisation.

    ``sequences [B * R, 1 + max_new_tokens]``; ``length``: how many leading columns transformers
    would return. Same arguments as :func:`generate`.
    """
    call = program(model, input_ids, attention_mask, generation_config, mesh=mesh, **kwargs)
    if mesh is None:
        return call.fn(*call.args)
    # The same program under ``mesh``: the model's activation constraints name the mesh's axes,
    # so it is traced inside ``jax.set_mesh``.
    args = tuple(a if sh is None else jax.device_put(a, sh)  # no-op for what is placed
                 for a, sh in zip(call.args, call.shardings))
    with jax.set_mesh(mesh):
        out = call.fn(*args)
    return GenerateOutput(out.sequences[:call.keep], out.length)


class Program(NamedTuple):
    """The one jitted program ``generate_fixed`` runs: ``fn(*args)`` (under ``jax.set_mesh``
    with a mesh, ``args`` placed by ``shardings``); the first ``keep`` rows are the output.
    ``jt5 plan generate`` compiles the same ``fn`` from the shapes of ``args``."""
    fn: object
    args: tuple           # (graphdef, static, state, ids, mask, knobs)
    shardings: tuple      # of args (None: as given, replicated), or None without a mesh
    keep: int


def program(model, input_ids, attention_mask=None,
            generation_config: GenerationConfig | None = None, *, mesh=None,
            **kwargs) -> Program:
    """The program and arguments of :func:`generate_fixed` (nothing runs). With ``mesh``: rows
    over data x fsdp, padded with empty prompts to whole rows per device; weights by
    ``jt5.sharding``'s logical rules (tensor: heads / MLP / vocab; fsdp: embed)."""
    r = resolve_config(model, generation_config, **kwargs)
    st, ids, mask, kn = _prepare(model, input_ids, attention_mask, r)
    graphdef, state = nnx.split(model)
    B = ids.shape[0]
    keep = B * st.num_return_sequences  # rows b*R .. b*R+R-1 belong to input b
    if mesh is None:
        return Program(_compiled, (graphdef, st, state, ids, mask, kn), None, keep)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    extra = -B % split  # whole rows per device: pad the batch with empty prompts, drop them after
    if extra:
        ids = np.concatenate([ids, np.full((extra, ids.shape[1]), kn.pad, ids.dtype)])
        mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), mask.dtype)])
        mask[B:, 0] = 1  # one visible token, so the padding rows stay finite
    rows = sharding.batch_sharding(mesh, 2)
    shardings = (None, None, sharding.param_shardings(state, mesh), rows, rows, None)
    return Program(_compiled, (graphdef, st, state, ids, mask, kn), shardings, keep)


def generate(model, input_ids, attention_mask=None,
             generation_config: GenerationConfig | None = None, *, mesh=None,
             **kwargs) -> np.ndarray:
    """Token ids ``[B * num_return_sequences, 1 + n]`` int32, laid out as transformers' output.

    ``kwargs`` are :class:`jt5.generation_config.GenerationConfig` fields (transformers' names:
    ``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``, ...; ``seed`` for
    sampling). Unset ones come from ``generation_config``, then the model's checkpoint
    (``model.generation_config``), then transformers' defaults — so ``generate(model, ids)``
    produces what transformers' ``generate(ids)`` does for the same directory. See the module
    docstring for what triggers a compilation. ``mesh`` (``jt5.sharding.make_mesh``): run
    sharded, rows over data x fsdp and weights over tensor / fsdp; the tokens are the
    single-device run's.
    """
    out = generate_fixed(model, input_ids, attention_mask, generation_config, mesh=mesh,
                         **kwargs)
    width = int(out.length)
    return np.asarray(out.sequences[:, :width])
