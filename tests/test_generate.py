"""jt5.generate against transformers' ``generate`` on tiny random models, token for token.

Every distinct (model, batch, input bucket, strategy, ...) compiles once (a few seconds on 2
cores), so the cases are chosen to share programs: ids, temperature, top_p, length_penalty,
min_new_tokens and the seed are traced and vary freely.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jt5  # noqa: E402
from jt5 import generate as gen  # noqa: E402
from tests import hf_models  # noqa: E402

NEW = 12  # max_new_tokens everywhere: one program per strategy and model
NEVER = -1  # an EOS id no model emits (rows run to max_new_tokens; shares the 1-EOS programs)
_MODELS: dict = {}


def _model(variant, tmp_path_factory):
    """(transformers model, jt5 model) of a variant, built once per test session."""
    if variant not in _MODELS:
        path = tmp_path_factory.mktemp(variant)
        hf = hf_models.build(variant, path, style="v4")
        _MODELS[variant] = hf, jt5.T5ForConditionalGeneration.from_pretrained(path,
                                                                               attention="xla")
    return _MODELS[variant]


def _inputs(seed=0, batch=3, length=11):
    """Random ids; rows 1 and 2 padded on the right (lengths 7 and 4); bucket 16."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 99, (batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if batch > 1:
        mask[1, 7:] = 0
    if batch > 2:
        mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


@nnx.jit
def _forward(model, ids, dec, mask):
    return model(ids, dec, mask)


def _hf_generate(hf, ids, mask, **kw):
    import torch
    with torch.no_grad():
        return hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                           max_new_tokens=NEW, pad_token_id=0, do_sample=False, **kw).numpy()


def _frequent_token(seqs) -> int:
    """A token most rows produce (not pad/eos/start): as EOS it ends rows at different steps."""
    counts = collections.Counter(t for row in seqs for t in set(row[2:].tolist()) if t > 1)
    return counts.most_common(1)[0][0]


def _assert_same(ours, ref, what):
    assert ours.shape == ref.shape and (ours == ref).all(), f"{what}\nours\n{ours}\nref\n{ref}"


@pytest.mark.parametrize("variant", ["t5-v1_0", "t5-v1_1", "mt5", "umt5"])
def test_greedy_matches_transformers(variant, tmp_path_factory):
    hf, model = _model(variant, tmp_path_factory)
    ids, mask = _inputs()
    ref = _hf_generate(hf, ids, mask, eos_token_id=1)
    _assert_same(gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=1,
                              pad_token_id=0), ref, f"{variant} greedy")
    eos = _frequent_token(ref)  # rows now finish early, at different steps, then pad
    for min_new in (0, 5):
        ref = _hf_generate(hf, ids, mask, eos_token_id=eos, min_new_tokens=min_new)
        ours = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                            pad_token_id=0, min_new_tokens=min_new)
        _assert_same(ours, ref, f"{variant} greedy eos={eos} min_new_tokens={min_new}")


# (variant, early_stopping, [length penalties], num_return_sequences). UMT5 beams use the tied
# variant: transformers v5 rescales an untied UMT5 head, which changes beam scores.
BEAM_CASES = [
    ("t5-v1_1", False, [1.0, 0.5], 1),
    ("t5-v1_1", True, [1.0, 2.0], 2),
    ("t5-v1_1", "never", [1.0, -0.5, 2.0], 3),
    ("t5-v1_0", False, [1.5], 2),
    ("mt5", True, [0.8], 1),
    ("umt5-tied", "never", [1.0, 1.7], 2),
]


@pytest.mark.parametrize("variant,early_stopping,penalties,nrs", BEAM_CASES,
                         ids=[f"{v}-es={e}" for v, e, _, _ in BEAM_CASES])
def test_beam_search_matches_transformers(variant, early_stopping, penalties, nrs,
                                          tmp_path_factory):
    hf, model = _model(variant, tmp_path_factory)
    ids, mask = _inputs(seed=1)
    eos = _frequent_token(_hf_generate(hf, ids, mask, eos_token_id=1, num_beams=3))
    for lp in penalties:
        for e in (1, eos):
            kw = dict(num_beams=3, length_penalty=lp, early_stopping=early_stopping,
                      num_return_sequences=nrs, eos_token_id=e)
            ref = _hf_generate(hf, ids, mask, **kw)
            ours = gen.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=0, **kw)
            _assert_same(ours, ref, f"{variant} beam {kw}")


def test_padded_rows_equal_single_rows(tmp_path_factory):
    _, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs(seed=2)
    for kw, fill in ((dict(eos_token_id=94), 0),  # greedy pads with pad (0)
                     (dict(num_beams=3, length_penalty=0.7, eos_token_id=94), 94)):  # beams: eos
        batch = gen.generate(model, ids, mask, max_new_tokens=NEW, pad_token_id=0, **kw)
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            alone = gen.generate(model, ids[b:b + 1, :n], None, max_new_tokens=NEW,
                                 pad_token_id=0, **kw)
            w = alone.shape[1]
            assert (batch[b, :w] == alone[0]).all(), (kw, b, batch[b], alone[0])
            assert (batch[b, w:] == fill).all(), (kw, b, batch[b], alone[0])


def test_cached_decoding_equals_full_recompute(tmp_path_factory):
    """Each greedy token is the argmax of the full (teacher-forced) decoder over the prefix."""
    _, model = _model("umt5", tmp_path_factory)  # per-layer bias tables
    ids, mask = _inputs(seed=3)
    out = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=NEVER)
    assert out.shape == (3, 1 + NEW)
    logits = np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(out), jnp.asarray(mask)))
    np.testing.assert_array_equal(out[:, 1:], logits[:, :-1].argmax(-1))


def _full_logits(model, ids, mask, seqs):
    r = len(seqs) // len(ids)  # num_return_sequences: rows b*r .. b*r+r-1 share input b
    return np.asarray(_forward(model, jnp.asarray(np.repeat(ids, r, 0)), jnp.asarray(seqs),
                               jnp.asarray(np.repeat(mask, r, 0))))


def test_sampling_reproducible_and_within_top_k_top_p(tmp_path_factory):
    _, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs(seed=4)
    # one program (top_k and "top_p < 1" are static); temperature, top_p and seed are traced
    kw = dict(max_new_tokens=NEW, do_sample=True, eos_token_id=NEVER, num_return_sequences=2,
              top_k=5)
    a = gen.generate(model, ids, mask, temperature=0.7, top_p=0.9999, seed=11, **kw)
    b = gen.generate(model, ids, mask, temperature=0.7, top_p=0.9999, seed=11, **kw)
    c = gen.generate(model, ids, mask, temperature=1.3, top_p=0.9999, seed=12, **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 1 + NEW) and not (a == c).all()
    assert len(set(a[:, 1:].ravel().tolist())) > 5  # it does sample, not argmax
    p = gen.generate(model, ids, mask, top_p=0.6, temperature=0.8, seed=3, **kw)
    for seqs, temp, top_p in ((a, 0.7, 1.0), (c, 1.3, 1.0), (p, 0.8, 0.6)):
        logits = _full_logits(model, ids, mask, seqs)[:, :-1] / np.float32(temp)
        chosen = np.take_along_axis(logits, seqs[:, 1:, None], -1)
        assert (chosen >= np.sort(logits, -1)[..., -5][..., None]).all()  # within the top 5
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        p_chosen = np.take_along_axis(probs, seqs[:, 1:, None], -1)
        mass_above = np.where(probs > p_chosen, probs, 0.0).sum(-1)
        assert (mass_above < top_p + 1e-5).all()  # inside the nucleus

    beams = dict(max_new_tokens=NEW, do_sample=True, num_beams=2, num_return_sequences=2,
                 eos_token_id=94, top_k=8)
    s1 = gen.generate(model, ids, mask, seed=1, **beams)
    np.testing.assert_array_equal(s1, gen.generate(model, ids, mask, seed=1, **beams))
    assert s1.shape[0] == 6 and not np.array_equal(s1, gen.generate(model, ids, mask, seed=2,
                                                                   **beams))


def test_processors_match_transformers():
    """Temperature -> top-k -> top-p and min_new_tokens, against transformers' processors."""
    import torch
    from transformers.generation import logits_process as lp

    from jt5 import processors
    from jt5.generation_config import GenerationConfig

    class Cfg:
        vocab_size, eos_token_id, pad_token_id, decoder_start_token_id = 50, 4, 0, 0

    rng = np.random.default_rng(0)
    scores = (3 * rng.standard_normal((4, 50))).astype(np.float32)
    scores[0, :3] = scores[0, 3]  # ties at the top-k boundary
    for top_k, top_p, temp, beams in ((0, 0.7, 0.6, 1), (7, 1.0, 1.4, 1), (7, 0.3, 0.9, 2),
                                      (1, 0.05, 1.0, 2)):
        keep = 2 if beams > 1 else 1  # 1 + #eos when beam sampling
        procs = lp.LogitsProcessorList([lp.MinNewTokensLengthLogitsProcessor(
            1, 3, torch.tensor([4]))])
        if temp != 1.0:
            procs.append(lp.TemperatureLogitsWarper(temp))
        if top_k:
            procs.append(lp.TopKLogitsWarper(top_k, min_tokens_to_keep=keep))
        if top_p < 1:
            procs.append(lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep))
        ref = procs(torch.zeros((4, 2), dtype=torch.long), torch.as_tensor(scores)).numpy()
        r = GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p, temperature=temp,
                             num_beams=beams, min_new_tokens=3, max_new_tokens=8).resolve(Cfg)
        st, kn = processors.build(r, 50, beam=beams > 1)
        ours = np.asarray(processors.process(jnp.asarray(scores), jnp.zeros((4, 9), jnp.int32),
                                             1, kn, st))
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)


def test_no_retrace_on_second_call(tmp_path_factory):
    _, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs(seed=5)
    kw = dict(max_new_tokens=NEW)
    gen.generate(model, ids, mask, **kw)
    before = gen.trace_count()
    # same shapes (the input length 9 falls in the same bucket), other traced values
    gen.generate(model, ids, mask, eos_token_id=7, pad_token_id=3, **kw)
    gen.generate(model, ids[:, :9], mask[:, :9], min_new_tokens=4, decoder_start_token_id=5,
                 **kw)
    assert gen.trace_count() == before
    gen.generate(model, ids, mask, **{**kw, "max_new_tokens": NEW + 1})  # a new shape
    assert gen.trace_count() == before + 1


def test_eos_then_pad_and_min_new_tokens(tmp_path_factory):
    _, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs(seed=6)
    free = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=NEVER)
    eos = int(free[0, 2])  # row 0 now stops at its second token
    out = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert out[0, 2] == eos and (out[0, 3:] == 0).all(), out[0]
    for row in out:
        hit = np.flatnonzero(row[1:] == eos)
        if hit.size:  # everything after the first EOS is pad
            assert (row[2 + hit[0]:] == 0).all(), row
        else:
            assert len(row) == 1 + NEW
    late = gen.generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0,
                        min_new_tokens=6)
    assert not (late[:, 1:7] == eos).any()


def test_bucket_length_and_bad_arguments(tmp_path_factory):
    assert [gen.bucket_length(n) for n in (1, 16, 17, 64, 65, 129, 200, 256, 257, 512, 513)] == \
        [16, 16, 32, 64, 96, 160, 224, 256, 288, 512, 576]
    _, model = _model("t5-v1_1", tmp_path_factory)
    ids, mask = _inputs()
    bad = [dict(num_beams=2, num_return_sequences=3), dict(num_return_sequences=2),
           dict(early_stopping="sometimes"), dict(max_new_tokens=0),
           dict(do_sample=True, top_p=0.0), dict(do_sample=True, temperature=0.0)]
    for kw in bad:
        with pytest.raises(ValueError):
            gen.generate(model, ids, mask, **kw)
    with pytest.raises(TypeError):
        gen.generate_fixed(model, ids, mask, beams=3)
    with pytest.raises(ValueError, match="attention_mask shape"):
        gen.generate(model, ids, mask[:, :5])


def test_sharded_generation_equals_single_device(tmp_path_factory):
    """On a 2x2x2 (data, fsdp, tensor) mesh of 8 CPU devices: rows over data x fsdp (3 rows
    padded to 4), heads / MLP over tensor, embed over fsdp; the same tokens as one device."""
    import jax

    from jt5 import sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS)")
    _, model = _model("t5-v1_1", tmp_path_factory)
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    ids, mask = _inputs(seed=9)
    for kw in (dict(eos_token_id=94), dict(num_beams=3, num_return_sequences=2,
                                           no_repeat_ngram_size=2, eos_token_id=94)):
        one = gen.generate(model, ids, mask, max_new_tokens=NEW, **kw)
        out = gen.generate_fixed(model, ids, mask, max_new_tokens=NEW, mesh=mesh, **kw)
        assert len(out.sequences.sharding.device_set) == 8
        _assert_same(np.asarray(out.sequences[:, :int(out.length)]), one, f"sharded {kw}")


def test_cli_generate(tmp_path, capsys):
    """``jt5 generate`` prints one text per input: what the library gives for the same ids."""
    from jt5.cli import main
    from jt5.tokenizer import load_tokenizer

    hf_models.build("byt5", tmp_path)  # a 384-id byte vocabulary
    texts = ["hello world", "hi"]
    assert main(["generate", "--model", str(tmp_path), "--tokenizer", "byte",
                 "--max-new-tokens", "6", "--num-beams", "2", *texts]) == 0
    printed = capsys.readouterr().out.splitlines()
    tok = load_tokenizer("byte")
    enc = tok.encode_batch(texts)
    model = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path)
    ids = gen.generate(model, enc.input_ids, enc.attention_mask, max_new_tokens=6, num_beams=2)
    assert printed == [tok.decode(r[1:].tolist()) for r in ids]
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --model ") and err.count("\n") == 1, err


def test_cli_task_and_batch_files(tmp_path, capsys, monkeypatch):
    """``--task`` applies config.json's task_specific_params and prefix (transformers'
    pipelines); ``--input`` .jsonl / stdin with ``--output`` keeps input order across length
    buckets and batches, each output what the library gives for that prompt alone."""
    import io
    import json

    from jt5.cli import main
    from jt5.tokenizer import load_tokenizer

    d = tmp_path / "m"
    hf_models.build("byt5", d)
    raw = json.loads((d / "config.json").read_text())
    task = {"num_beams": 2, "max_length": 6, "no_repeat_ngram_size": 2, "prefix": "sum: "}
    raw["task_specific_params"] = {"summarization": task}
    (d / "config.json").write_text(json.dumps(raw))
    tok = load_tokenizer("byte")
    model = jt5.T5ForConditionalGeneration.from_pretrained(d)

    def alone(text, show=False, **kw):
        enc = tok.encode_batch([text])
        row = gen.generate(model, enc.input_ids, enc.attention_mask, **kw)[0, 1:].tolist()
        while row and row[-1] == tok.pad_id:
            row.pop()
        return tok.decode(row, skip_special_tokens=not show)

    assert main(["generate", "--model", str(d), "--tokenizer", "byte", "--task",
                 "summarization", "hello"]) == 0
    want = alone("sum: hello", num_beams=2, max_length=6, no_repeat_ngram_size=2)
    assert capsys.readouterr().out.splitlines() == [want]
    assert main(["generate", "--model", str(d), "--tokenizer", "byte", "--task", "translation",
                 "x"]) == 1
    assert "--task translation" in capsys.readouterr().err

    prompts = ["a much longer prompt than the others, past sixteen bytes", "hi", "mid size",
               "yo"]
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    out = tmp_path / "o.jsonl"
    assert main(["generate", "--model", str(d), "--tokenizer", "byte", "--input", str(src),
                 "--output", str(out), "--batch-size", "2", "--max-new-tokens", "5",
                 "--show-special-tokens"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["input"] for r in rows] == prompts
    assert [r["output"] for r in rows] == [alone(p, True, max_new_tokens=5) for p in prompts]
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nyo\n"))
    assert main(["generate", "--model", str(d), "--tokenizer", "byte", "--input", "-",
                 "--max-new-tokens", "5", "--show-special-tokens"]) == 0
    assert capsys.readouterr().out.splitlines() == [rows[1]["output"], rows[3]["output"]]


@pytest.mark.slow
def test_pallas_generate_equals_xla(tmp_path):
    """The whole loop on the kernels (interpret mode on CPU): flash attention in the encoder,
    flash-decoding over the cache (length rounded to whole tiles) and the cross K/V."""
    hf_models.build("umt5-tied", tmp_path)
    xla = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="xla")
    pallas = jt5.T5ForConditionalGeneration.from_pretrained(tmp_path, attention="pallas")
    ids, mask = _inputs(seed=7)
    for kw in (dict(), dict(num_beams=2, length_penalty=1.3, num_return_sequences=2)):
        a = gen.generate(xla, ids, mask, max_new_tokens=NEW, eos_token_id=NEVER, **kw)
        b = gen.generate(pallas, ids, mask, max_new_tokens=NEW, eos_token_id=NEVER, **kw)
        _assert_same(b, a, f"pallas vs xla {kw}")
