"""jt5.tokenizer against transformers' ByT5Tokenizer and a tiny offline Hugging Face tokenizer."""
import json
import subprocess
import sys

import numpy as np
import pytest

from jt5.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, tokenizer_files

TEXTS = ["", "hello world", "héllo wörld ☃", "emoji 😀 and CJK 漢字 and RTL שלום", "tabs\tand\nnewlines\r\n",
         "<extra_id_x> and <s> look special but are text", "\x00\x7f\u00ff\u0100"]


@pytest.fixture(scope="module")
def byt5():
    transformers = pytest.importorskip("transformers")
    return transformers.ByT5Tokenizer()


def test_byte_ids_match_byt5(byt5):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.unk_id) == (
        len(byt5), byt5.pad_token_id, byt5.eos_token_id, byt5.unk_token_id) == (384, 0, 1, 2)
    for text in TEXTS:
        if "<extra_id" in text:  # transformers parses special-token strings inside text; we do not
            continue
        assert tok.encode(text, add_eos=True) == byt5(text).input_ids, text
        assert tok.encode(text) == byt5(text, add_special_tokens=False).input_ids, text


def test_byte_extra_ids_count_down_from_the_top(byt5):
    tok = ByteTokenizer()
    assert tok.extra_id(0) == 383 == tok.vocab_size - 1
    assert tok.extra_id(124) == 259
    assert [tok.extra_id(i) for i in range(3)] == [383, 382, 381]
    hf_extra = {byt5.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(125)}
    assert set(tok.extra_ids.tolist()) == hf_extra == set(range(259, 384))
    with pytest.raises(IndexError):
        tok.extra_id(125)


def test_byte_decode_round_trip_and_parity(byt5):
    tok = ByteTokenizer()
    for text in TEXTS:
        ids = tok.encode(text, add_eos=True)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == byt5.decode(ids, skip_special_tokens=True)
    # specials and a truncated multi-byte character (0xC3 alone) are skipped as transformers does
    ids = [0, 107, 0xC3 + 3, 0xA9 + 3, 1, 0xC3 + 3, 2, 111, 383, 0]  # h é </s> (0xC3) <unk> l
    assert tok.decode(ids) == byt5.decode(ids, skip_special_tokens=True) == "hél"
    assert tok.decode(np.asarray(ids, np.int32)) == "hél"
    rendered = tok.decode([107, 383, 108, 1, 0], skip_special_tokens=False)
    assert rendered == "h<extra_id_0>i</s><pad>"


def test_batch_helpers():
    tok = ByteTokenizer()
    enc = tok.encode_batch(["ab", "", "héllo"])
    assert enc.input_ids.dtype == np.int32 and enc.input_ids.shape == (3, 7)
    assert enc.attention_mask.tolist() == [[1] * 3 + [0] * 4, [1] + [0] * 6, [1] * 7]
    assert enc.input_ids[1, 0] == tok.eos_id and enc.input_ids[0, 2] == tok.eos_id
    assert tok.decode_batch(enc.input_ids) == ["ab", "", "héllo"]
    cut = tok.encode_batch(["abcdef"], max_length=4, pad_to_max_length=True)
    assert cut.input_ids.tolist() == [[100, 101, 102, 1]]
    wide = tok.encode_batch(["a"], max_length=5, pad_to_max_length=True, add_eos=False)
    assert wide.input_ids.tolist() == [[100, 0, 0, 0, 0]] and wide.attention_mask.sum() == 1
    with pytest.raises(TypeError):
        tok.encode_batch("not a list")


def _tiny_hf_dir(path, extra_ids=4, letters=False):
    """A T5-like Unigram tokenizer.json (with <extra_id_N>) saved the way transformers saves it."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast
    pieces = ["▁the", "▁quick", "▁brown", "▁fox", "▁h", "é", "llo", "▁", "a", "b", "c", "d", "e",
              "h", "l", "o", "r", "w", "ö", "☃", "."]
    if letters:  # every lowercase letter, digit and ':' so any such text tokenises without <unk>
        pieces += [c for c in "fgijkmnpqstuvxyz0123456789:" if c not in pieces]
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -float(i + 1)) for i, p in enumerate(pieces)]
    vocab += [(e, 0.0) for e in reversed(extra)]  # T5 layout: <extra_id_0> is the top id
    tk = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tk.decoder = tokenizers.decoders.Metaspace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            additional_special_tokens=extra).save_pretrained(str(path))
    return str(path)


def test_hf_tokenizer_directory(tmp_path):
    tok = load_tokenizer(_tiny_hf_dir(tmp_path / "tok"))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 28)
    assert tok.extra_ids.tolist() == [27, 26, 25, 24] and tok.extra_id(0) == 27
    ids = tok.encode("the quick héllo fox.", add_eos=True)
    assert ids[-1] == 1 and 2 not in ids
    assert tok.decode(ids) == "the quick héllo fox."
    assert [a.tolist() for a in tok.encode_many(["the fox", "héllo"])] == [tok.encode("the fox"), tok.encode("héllo")]
    enc = tok.encode_batch(["the fox", "the"])
    assert enc.input_ids.tolist() == [tok.encode("the fox", add_eos=True), tok.encode("the", add_eos=True) + [0]]
    assert enc.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert tok.fingerprint == load_tokenizer(str(tmp_path / "tok")).fingerprint


def test_load_tokenizer_errors_and_byt5_dirs(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="neither 'byte' nor an existing directory"):
        load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "byt5").mkdir()
    (tmp_path / "byt5" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125}))
    tok = load_tokenizer(str(tmp_path / "byt5"))
    assert isinstance(tok, ByteTokenizer) and tok.extra_id(0) == 383


def test_imports_without_torch_or_transformers():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import jt5.tokenizer as t\n"
            "tok = t.load_tokenizer('byte'); assert tok.decode(tok.encode('ok')) == 'ok'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _spm_dir(tmp_path):
    """A T5-style directory holding only spiece.model + tokenizer_config.json (older checkpoints)."""
    pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    lines = [f"the quick brown fox jumps over the lazy dog {i} times. héllo wörld" for i in range(200)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    d = tmp_path / "t5tok"
    d.mkdir()
    (d / "spiece.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 5, "eos_token": "</s>", "pad_token": "<pad>",
         "unk_token": "<unk>"}))
    return d


def test_hf_sentencepiece_directory(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    d = _spm_dir(tmp_path)
    tok = load_tokenizer(str(d))
    sp = spm.SentencePieceProcessor(model_file=str(d / "spiece.model"))
    text = "the lazy fox héllo 7 times"
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text, add_eos=True)) == text
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (65, 0, 1)
    assert tok.extra_ids.tolist() == [64, 63, 62, 61, 60]  # T5: <extra_id_0> on top


def test_byte_prompt_special_tokens_become_ids():
    """Prompts may name sentinels and EOS as text, like transformers' ByT5Tokenizer allows."""
    tok = ByteTokenizer()
    ids = tok.encode("a<extra_id_0>b<extra_id_2></s><extra_id_999>")
    assert ids == [ord("a") + 3, 383, ord("b") + 3, 381, 1] + [c + 3 for c in b"<extra_id_999>"]
    assert tok.decode(ids, skip_special_tokens=False) == "a<extra_id_0>b<extra_id_2></s><extra_id_999>"
    # corpus text is raw bytes: a docstring mentioning "</s>" stays text
    assert tok.encode_many(["</s>"])[0].tolist() == [c + 3 for c in b"</s>"]


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_encode_batch_parses_special_tokens_like_encode(kind, tmp_path):
    """Prompts take one path: encode_batch (what `jt5 generate` calls) == encode + EOS."""
    tok = ByteTokenizer() if kind == "byte" else load_tokenizer(_tiny_hf_dir(tmp_path / "tok"))
    texts = ["<extra_id_0>x", "a<extra_id_1>b</s>", "plain"]
    enc = tok.encode_batch(texts)
    for row, mask, text in zip(enc.input_ids, enc.attention_mask, texts):
        assert row[mask == 1].tolist() == tok.encode(text, add_eos=True), text
    if kind == "byte":
        assert enc.input_ids[0, :3].tolist() == [383, ord("x") + 3, 1]


def _write(files, d):
    d.mkdir()
    for name, content in files.items():
        (d / name).write_bytes(content)
    return d


def _assert_auto_tokenizer_agrees(tok, directory):
    """transformers' AutoTokenizer on ``directory`` gives jt5's id for every special token."""
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(directory))
    names = {"<pad>": tok.pad_id, "</s>": tok.eos_id, "<unk>": tok.unk_id}
    names.update({f"<extra_id_{i}>": tok.extra_id(i) for i in range(tok.num_extra_ids)})
    got = dict(zip(names, auto.convert_tokens_to_ids(list(names))))
    wrong = {k: (got[k], v) for k, v in names.items() if got[k] != v}
    assert not wrong, f"AutoTokenizer vs jt5 ids: {dict(list(wrong.items())[:5])}"
    assert auto.convert_ids_to_tokens(tok.extra_id(0)) == "<extra_id_0>"
    prompt = "the fox<extra_id_0> héllo<extra_id_1>.</s>"
    assert auto(prompt, add_special_tokens=False).input_ids == tok.encode(prompt)
    ids = tok.encode(prompt, add_eos=True)
    assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_exported_byte_tokenizer_has_jt5_sentinel_ids(tmp_path):
    """ByT5Tokenizer alone numbers <extra_id_i> upward (259 + i); the export pins 383 - i."""
    tok = ByteTokenizer()
    d = _write(tokenizer_files("byte"), tmp_path / "export")
    _assert_auto_tokenizer_agrees(tok, d)
    assert isinstance(load_tokenizer(str(d)), ByteTokenizer)
    # an export written before the fix (no added_tokens_decoder) is rewritten when copied on
    old = tmp_path / "old"
    old.mkdir()
    (old / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "ByT5Tokenizer", "extra_ids": 125, "eos_token": "</s>"}))
    _assert_auto_tokenizer_agrees(tok, _write(tokenizer_files(str(old)), tmp_path / "recopied"))
    small = ByteTokenizer(extra_ids=7)  # another sentinel count keeps the convention too
    _assert_auto_tokenizer_agrees(small, _write(small.files(), tmp_path / "small"))


def test_exported_sentencepiece_tokenizer_agrees_with_jt5(tmp_path):
    src = _spm_dir(tmp_path)
    files = tokenizer_files(str(src))
    assert files["spiece.model"] == (src / "spiece.model").read_bytes()  # binary files too
    d = _write(files, tmp_path / "export")
    _assert_auto_tokenizer_agrees(load_tokenizer(str(src)), d)
    assert load_tokenizer(str(d)).extra_ids.tolist() == load_tokenizer(str(src)).extra_ids.tolist()
