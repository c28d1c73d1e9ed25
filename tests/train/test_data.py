"""train.data / train.corpus: readers, token cache, packing isolation, resumability, host sharding."""
import json

import numpy as np
import pytest

from jt5.train import corpus
from jt5.train.data import FEATURES, DataConfig, Pipeline, batch_stats, build_token_store, special_ids
from jt5.train.ul2 import MIXTURES, UL2_MIXTURE
from jt5.tokenizer import ByteTokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega héllo wörld ☃").split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS, size=n_words))


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """A directory: a JSONL file of very short documents (so rows pack several examples) + a text file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    with open(root / "a.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"doc{i}: " + _text(rng, int(rng.integers(1, 12))), "id": i}) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are skipped
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text(_text(rng, 3000))
    return root


def _config(tmp_path, data, **kw):
    base = dict(data=(str(data),), inputs_length=128, targets_length=64, batch_size=8, seed=3,
                cache_dir=str(tmp_path / "cache"), heldout_documents=0)
    base.update(kw)
    return DataConfig(**base)


def _doc_bytes(data):
    return [doc.read().encode() for doc in corpus.iter_documents([str(data)])]


def _undo(pipe, inputs, targets):
    """Raw token ids of the chunk an example came from (span corruption undone / prefix rejoined)."""
    modes = {v: k for k, v in pipe.specials.modes.items()}
    sent = set(pipe.specials.sentinels.tolist())
    kind = modes[int(inputs[0])]
    inputs, targets = inputs[1:-1].tolist(), targets[:-1].tolist()
    if kind == "[S]":
        return inputs + targets
    pieces, cur = {}, None
    for t in targets:
        if t in sent:
            cur = t
            pieces[cur] = []
        else:
            pieces[cur].append(t)
    out = []
    for t in inputs:
        out += pieces[t] if t in sent else [t]
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_batch_shapes_dtypes(tmp_path, short_docs, pack):
    pipe = Pipeline(_config(tmp_path, short_docs, pack=pack))
    b = pipe.batch(0)
    assert list(b) == list(FEATURES)
    for k, v in b.items():
        L = 128 if k.startswith("encoder") else 64
        assert v.shape == (8, L), k
        assert v.dtype == (np.float32 if k == "decoder_loss_weights" else np.int32), k
    assert (b["decoder_loss_weights"] == (b["decoder_segment_ids"] > 0)).all()
    assert b["encoder_input_tokens"].max() < pipe.vocab_size == 384
    if not pack:
        for side in ("encoder", "decoder"):
            seg = b[f"{side}_segment_ids"]
            assert set(np.unique(seg)) <= {0, 1}
            n = seg.sum(1)
            assert (seg == (np.arange(seg.shape[1]) < n[:, None])).all()  # one example, left-aligned


@pytest.mark.parametrize("source", ["a.jsonl", "."])
def test_packing_never_mixes_examples(tmp_path, short_docs, source):
    pipe = Pipeline(_config(tmp_path, short_docs / source, batch_size=16))
    docs = _doc_bytes(short_docs)
    packed_rows = 0
    for step in range(6):
        b = pipe.batch(step)
        for r in range(16):
            enc_seg, dec_seg = b["encoder_segment_ids"][r], b["decoder_segment_ids"][r]
            ids = np.unique(enc_seg[enc_seg > 0])
            assert ids.tolist() == list(range(1, len(ids) + 1))                 # 1, 2, ... per row
            assert np.unique(dec_seg[dec_seg > 0]).tolist() == ids.tolist()     # same examples both sides
            packed_rows += len(ids) > 1
            for side, seg in (("encoder", enc_seg), ("decoder", dec_seg)):
                live = np.flatnonzero(seg)
                assert (np.diff(seg[live]) >= 0).all() and (seg[live[-1] + 1:] == 0).all()  # contiguous
                for s in ids:
                    where = np.flatnonzero(seg == s)
                    assert (np.diff(where) == 1).all()
                    assert (b[f"{side}_positions"][r, where] == np.arange(len(where))).all()
            for s in ids:
                e = b["encoder_input_tokens"][r, enc_seg == s]
                d_in = b["decoder_input_tokens"][r, dec_seg == s]
                d_tgt = b["decoder_target_tokens"][r, dec_seg == s]
                assert d_in[0] == 0 and (d_in[1:] == d_tgt[:-1]).all()   # shifted within the segment
                assert e[-1] == 1 and d_tgt[-1] == 1                      # each segment ends with EOS
                raw = pipe.tokenizer.decode(_undo(pipe, e, d_tgt)).encode()
                assert any(raw in doc for doc in docs)  # encoder and decoder segment s are one example
    assert packed_rows > 16  # short documents really pack


def test_packing_fills_rows_with_short_documents(tmp_path, short_docs):
    packed = Pipeline(_config(tmp_path, short_docs / "a.jsonl", batch_size=32))
    unpacked = Pipeline(_config(tmp_path, short_docs / "a.jsonl", batch_size=32, pack=False))
    p = [batch_stats(packed.batch(s)) for s in range(5)]
    u = [batch_stats(unpacked.batch(s)) for s in range(5)]
    assert np.mean([f["examples_per_row"] for f in p]) > 2.5
    fill = {k: (np.mean([f[k] for f in p]), np.mean([f[k] for f in u])) for k in ("encoder_fill", "decoder_fill")}
    assert fill["decoder_fill"][0] > 0.85 and fill["encoder_fill"][0] > 0.65  # X examples bind the decoder
    assert all(packed_fill > 2.5 * unpacked_fill for packed_fill, unpacked_fill in fill.values())


def test_same_stream_after_resume(tmp_path, short_docs):
    cfg = _config(tmp_path, short_docs)
    a = Pipeline(cfg)
    first = {s: a.batch(s) for s in (0, 7, 8)}
    b = Pipeline(cfg)  # a fresh pipeline (cache hit), as after a restart
    for s, batch in first.items():
        again = b.batch(s)
        assert all((again[k] == batch[k]).all() for k in FEATURES)
    assert not (first[7]["encoder_input_tokens"] == first[8]["encoder_input_tokens"]).all()
    step, batch = next(b.iterate(start_step=7))
    assert step == 7 and all((batch[k] == first[7][k]).all() for k in FEATURES)
    it = b.iterate(start_step=7, prefetch=0)
    assert [next(it)[0] for _ in range(2)] == [7, 8]
    other_seed = Pipeline(_config(tmp_path, short_docs, seed=4)).batch(7)
    assert not (other_seed["encoder_input_tokens"] == first[7]["encoder_input_tokens"]).all()


def test_hosts_get_disjoint_documents(tmp_path, short_docs):
    cfg = _config(tmp_path, short_docs, batch_size=8, heldout_documents=3)
    hosts = [Pipeline(cfg, process_index=i, process_count=2) for i in range(2)]
    a, b = (set(h.store.doc_index.tolist()) for h in hosts)
    assert not a & b and all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)
    held = {i for i, _, h in corpus.split_heldout(corpus.iter_documents(cfg.data), 3) if h}
    assert held and not held & (a | b)
    assert a | b | held == set(range(len(_doc_bytes(short_docs))))
    assert hosts[0].batch(0)["encoder_input_tokens"].shape == (4, 128)
    assert not (hosts[0].batch(0)["encoder_input_tokens"] == hosts[1].batch(0)["encoder_input_tokens"]).all()
    with pytest.raises(ValueError, match="divisible"):
        Pipeline(cfg, process_index=0, process_count=3)


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: invalid JSON"):
        [d.read() for d in corpus.iter_documents([str(bad)])]
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: no 'text' field"):
        [d.read() for d in corpus.iter_documents([str(missing)])]
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"wrong\.jsonl:1: 'text' is int"):
        [d.read() for d in corpus.iter_documents([str(wrong)])]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"line one\nline two\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin\.txt:3: not valid UTF-8"):
        [d.read() for d in corpus.iter_documents([str(latin)])]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list(corpus.iter_documents([str(tmp_path / "nowhere")]))
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):  # also through the pipeline
        Pipeline(_config(tmp_path, bad))


def test_readers_order_and_pieces(tmp_path, short_docs):
    docs = list(corpus.iter_documents([str(short_docs)]))
    assert docs[0].key == f"{short_docs.name}/a.jsonl:1" and docs[-1].key == f"{short_docs.name}/sub/b.txt#0"
    assert len(docs) == 301 and json.loads((short_docs / "a.jsonl").read_text().splitlines()[0])["text"] == docs[0].read()
    pieces = list(corpus.iter_documents([str(short_docs / "sub" / "b.txt")], max_chars=1000))
    text = (short_docs / "sub" / "b.txt").read_text()
    assert len(pieces) > 10 and "".join(p.read() for p in pieces) == text
    assert all(len(p.read()) <= 1000 for p in pieces)


def test_token_cache_is_reused(tmp_path, short_docs, monkeypatch):
    cfg = _config(tmp_path, short_docs)
    tok = ByteTokenizer()
    first = build_token_store(cfg, tok)
    monkeypatch.setattr(ByteTokenizer, "encode_many", lambda *a: pytest.fail("tokenised twice"))
    again = build_token_store(cfg, tok)
    assert again.path == first.path and (np.asarray(again.tokens) == np.asarray(first.tokens)).all()
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1  # no temporary leftovers


def test_special_ids_layout():
    tok = ByteTokenizer()
    sp = special_ids(tok, UL2_MIXTURE)
    assert sp.modes == {"[R]": 259, "[S]": 260, "[X]": 261} and sp.eos == 1
    assert sp.sentinels[0] == 383 and sp.sentinels[-1] == 262 and (np.diff(sp.sentinels) == -1).all()
    t5 = special_ids(tok, MIXTURES["t5"])
    assert t5.modes == {} and len(t5.sentinels) == 125 and t5.sentinels[0] == 383
    custom = special_ids(tok, UL2_MIXTURE, mode_ids=(300, 301, 302), first_sentinel=383, num_sentinels=50)
    assert custom.modes["[S]"] == 301 and len(custom.sentinels) == 50
    assert special_ids(tok, UL2_MIXTURE, mode_ids=(383, 382, 381)).sentinels[0] == 380
    with pytest.raises(ValueError, match="both mode tokens and sentinels"):
        special_ids(tok, UL2_MIXTURE, mode_ids=(383, 382, 381), first_sentinel=383)


def test_builtin_corpus_and_sample_prompts(tmp_path):
    keys = [d.key for d in corpus.builtin_documents()]
    assert keys == sorted(keys) and "json/decoder.py" in keys and not any("/test/" in k for k in keys)
    cfg = DataConfig(data="builtin", inputs_length=256, targets_length=64, batch_size=4,
                     cache_dir=str(tmp_path / "cache"))
    pipe = Pipeline(cfg)
    assert 1_000_000 < len(pipe.store.tokens) < 8_000_000  # a few MB of text
    held = pipe.heldout_documents()
    assert len(held) == 8 and all(text for _, text in held)
    index = {d.key: i for i, d in enumerate(corpus.builtin_documents())}
    assert not {index[k] for k, _ in held} & set(pipe.store.doc_index.tolist())
    prompts = pipe.sample_prompts()
    assert [p.denoiser.kind for p in prompts] == ["R", "S", "X"]
    assert [int(p.inputs[0]) for p in prompts] == [259, 260, 261]
    assert all(p.inputs[-1] == 1 and p.targets[-1] == 1 for p in prompts)
    again = Pipeline(cfg).sample_prompts()
    assert all((p.inputs == q.inputs).all() and (p.targets == q.targets).all() for p, q in zip(prompts, again))
    shown = pipe.render(prompts[0].inputs)
    assert shown.startswith("[R]") and "<extra_id_0>" in shown and shown.endswith("</s>")
    assert "text" in corpus.module_document('"""text"""\ndef f(a, b=1):\n    """doc"""\n', "m")


def test_pipeline_with_a_hugging_face_tokenizer(tmp_path, short_docs):
    from tests.test_tokenizer import _tiny_hf_dir
    tok_dir = _tiny_hf_dir(tmp_path / "tok", extra_ids=40, letters=True)
    pipe = Pipeline(_config(tmp_path, short_docs / "a.jsonl", tokenizer=tok_dir, inputs_length=48,
                            targets_length=24))
    extra = pipe.tokenizer.extra_ids
    assert sorted(pipe.specials.modes.values()) == sorted(extra)[:3]      # lowest extra ids are modes
    assert pipe.specials.sentinels.tolist() == [i for i in extra.tolist() if i not in pipe.specials.modes.values()]
    assert pipe.specials.sentinels[0] == pipe.tokenizer.extra_id(0)        # <extra_id_0> first
    b = pipe.batch(0)
    assert b["encoder_input_tokens"].max() < pipe.vocab_size
    seg = b["encoder_segment_ids"]
    for r in range(len(seg)):
        for s in np.unique(seg[r][seg[r] > 0]):
            first = b["encoder_input_tokens"][r][seg[r] == s][0]
            assert first in pipe.specials.modes.values()
    prompt = pipe.render(b["encoder_input_tokens"][0])
    assert prompt[:3] in ("[R]", "[S]", "[X]")
