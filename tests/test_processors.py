"""Logits processors in the compiled loop against transformers, token for token.

Each processor runs in greedy, sampling (``top_k=1``: the one surviving token is sampled with
certainty, so the sampling path is compared token for token too) and beam search, on a tiny
random model, against transformers' ``generate`` with the same keywords. Parameters are chosen
from the unprocessed output so every processor changes it (asserted: the tests can fail).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jt5 import generate as gen  # noqa: E402
from jt5 import processors  # noqa: E402
from jt5.generation_config import GenerationConfig  # noqa: E402
from tests.test_generate import _assert_same, _inputs, _model  # noqa: E402

NEW = 10
STRATEGIES = {"greedy": {}, "sample": dict(do_sample=True, top_k=1),
              "beam": dict(num_beams=3, length_penalty=1.3)}


def _hf_raw(hf, ids, mask, **kw):
    import torch
    with torch.no_grad():
        return hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                           pad_token_id=0, **kw).numpy()


def _hf(hf, ids, mask, **kw):
    return _hf_raw(hf, ids, mask, max_new_tokens=NEW, **kw)


def _cases(plain: np.ndarray, ids: np.ndarray) -> dict:
    """Processor keywords built from the unprocessed greedy output so each one bites."""
    row = plain[0, 1:].tolist()
    common = [int(t) for t in np.unique(plain[:, 1:4])[:3]]
    return {
        "repetition_penalty": dict(repetition_penalty=1.8),
        "repetition_reward": dict(repetition_penalty=0.6),
        "no_repeat_ngram_1": dict(no_repeat_ngram_size=1),
        "no_repeat_ngram_2": dict(no_repeat_ngram_size=2),
        "encoder_no_repeat_ngram": dict(encoder_no_repeat_ngram_size=1),
        "bad_words": dict(bad_words_ids=[[row[0]], [row[1], row[2]], [0, row[0], row[1]]]),
        "suppress_tokens": dict(suppress_tokens=common),
        "begin_suppress_tokens": dict(begin_suppress_tokens=common),
        "forced_bos": dict(forced_bos_token_id=int(ids[0, 0])),
        # one id: two forced ids tie at 0, and a sampled tie is a coin flip in both libraries
        "forced_eos": dict(forced_eos_token_id=[row[3]]),
        "exponential_decay": dict(exponential_decay_length_penalty=(2, 1.6),
                                  eos_token_id=row[4]),
        "min_length": dict(min_length=7, eos_token_id=row[2]),
        "max_length": dict(max_length=6),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs(seed=8)
    plain = {s: _hf(hf, ids, mask, eos_token_id=1, **kw) for s, kw in STRATEGIES.items()}
    return hf, model, ids, mask, plain


CASES = list(_cases(np.zeros((1, 8), int), np.zeros((1, 1), int)))


@pytest.mark.parametrize("case", CASES)
def test_processor_matches_transformers(case, setup):
    hf, model, ids, mask, plain = setup
    kw = _cases(plain["greedy"], ids)[case]
    changed = False
    for strategy, skw in STRATEGIES.items():
        args = {"eos_token_id": 1, **skw, **kw}
        if case != "max_length":  # max_length alone sets the length there
            args["max_new_tokens"] = NEW
        ref = _hf_raw(hf, ids, mask, **args)
        ours = gen.generate(model, ids, mask, pad_token_id=0, **args)
        _assert_same(ours, ref, f"{case} {strategy} {args}")
        base = plain[strategy]
        changed |= ref.shape != base.shape or not (ref == base).all()
    assert changed, f"{case}: {kw} changed no strategy's output; the test would not catch a bug"


def test_summarization_combination_matches_transformers(setup):
    """t5-small's summarization settings (shorter lengths): beams 4, no_repeat_ngram_size 3,
    length_penalty 2.0, min_length / max_length, early_stopping."""
    hf, model, ids, mask, plain = setup
    kw = dict(num_beams=4, no_repeat_ngram_size=3, length_penalty=2.0, min_length=8,
              max_length=14, early_stopping=True, eos_token_id=int(plain["beam"][0, 5]))
    ref = _hf_raw(hf, ids, mask, **kw)
    _assert_same(gen.generate(model, ids, mask, pad_token_id=0, **kw), ref, f"{kw}")


def test_traced_values_do_not_recompile(setup):
    _, model, ids, mask, plain = setup
    row = plain["greedy"][0, 1:].tolist()
    base = dict(max_new_tokens=NEW, repetition_penalty=1.3, bad_words_ids=[[5], [6, 7]],
                suppress_tokens=[3, 4], forced_bos_token_id=9,
                exponential_decay_length_penalty=(2, 1.5))
    first = gen.generate(model, ids, mask, **base)
    before = gen.trace_count()
    variants = [dict(repetition_penalty=1.9), dict(repetition_penalty=0.5),
                dict(bad_words_ids=[[row[0]], [row[1], row[2]]]), dict(suppress_tokens=[8, 2]),
                dict(forced_bos_token_id=11), dict(exponential_decay_length_penalty=(4, 1.1)),
                dict(min_new_tokens=3), dict(min_length=5)]
    outs = [gen.generate(model, ids, mask, **{**base, **v}) for v in variants]
    assert gen.trace_count() == before, "a traced processor value recompiled the program"
    assert any(o.shape != first.shape or (o != first).any() for o in outs)
    gen.generate(model, ids, mask, **{**base, "repetition_penalty": 1.0})  # off: a new program
    assert gen.trace_count() == before + 1


def test_processor_chain_on_scores_matches_transformers(setup):
    """All processors at once on random scores and token buffers, every step, against the list
    transformers' ``_get_logits_processor`` builds (its order is what is checked here)."""
    import copy

    import torch
    from transformers import GenerationConfig as HFConfig

    hf, *_ = setup
    V, R, L = 99, 6, 12
    rng = np.random.default_rng(0)
    enc = torch.as_tensor(rng.integers(2, 20, (2, 9)))
    kw = dict(repetition_penalty=1.4, no_repeat_ngram_size=2, encoder_no_repeat_ngram_size=2,
              bad_words_ids=[[4], [5, 6], [7, 8, 9]], suppress_tokens=[10, 11],
              begin_suppress_tokens=[12], forced_eos_token_id=[13, 14], min_length=4,
              exponential_decay_length_penalty=(3, 1.3), eos_token_id=[2, 3], max_length=L,
              do_sample=True, top_k=9, top_p=0.8, temperature=0.7)
    hf_cfg = copy.deepcopy(HFConfig(**kw, pad_token_id=0, decoder_start_token_id=0))
    hf._prepare_special_tokens(hf_cfg, True, device="cpu")
    procs = hf._get_logits_processor(hf_cfg, input_ids_seq_length=1, encoder_input_ids=enc,
                                     device="cpu")
    r = GenerationConfig(**kw).resolve(_Cfg(V))
    st, kn = processors.build(r, V, beam=False)
    seqs = rng.integers(2, 20, (R, L)).astype(np.int32)
    seqs[:, 0] = 0
    windows = processors.encoder_windows(jnp.asarray(enc.numpy(), jnp.int32), 9,
                                         st.encoder_ngram, R // 2)
    for step in range(L - 1):
        scores = (3 * rng.standard_normal((R, V))).astype(np.float32)
        ref = procs(torch.as_tensor(seqs[:, :step + 1], dtype=torch.long),
                    torch.as_tensor(scores)).numpy()
        ours = np.asarray(processors.process(jnp.asarray(scores), jnp.asarray(seqs), step, kn,
                                             st, windows))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0, err_msg=f"step {step}")


class _Cfg:
    """The model-config fields ``resolve`` reads."""
    def __init__(self, vocab):
        self.vocab_size, self.eos_token_id, self.pad_token_id = vocab, 1, 0
        self.decoder_start_token_id = 0
