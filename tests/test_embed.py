"""jt5.embed / ``jt5 embed``: equal to transformers' T5EncoderModel, padding excluded from the mean,
input order kept across length buckets, 8 devices equal to 1, encoder-only exports, file outputs."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jt5
from tests.conftest import assert_close

# Lengths spread over several buckets (16, 32, 64) and unsorted, so order must be restored.
TEXTS = ["a much longer sentence than the others, to land in the 64 bucket " * 1,
         "hi", "short one", "", "medium length text here!", "x" * 40, "héllo wörld", "b" * 17,
         "another fairly long line of text to embed", "z"]


@pytest.fixture(scope="module")
def reference(byt5_dir):
    """transformers' T5EncoderModel hidden states of TEXTS (float32), one text at a time."""
    import torch
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(byt5_dir)
    enc = transformers.T5EncoderModel.from_pretrained(byt5_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t).input_ids])
            out.append(enc(input_ids=ids).last_hidden_state[0].numpy())
    return out


def test_per_token_and_pooled_equal_transformers(byt5_dir, reference):
    one = [jax.devices()[0]]
    got = jt5.embed(byt5_dir, TEXTS, pooling="none", batch_size=4, devices=one)
    L = max(len(r) for r in reference)
    assert got.embeddings.shape == (len(TEXTS), L, reference[0].shape[-1])
    for i, ref in enumerate(reference):
        n = len(ref)
        assert got.mask[i].sum() == n and got.mask[i, :n].all()
        assert_close(got.embeddings[i, :n], ref, dtype="float32", check="hidden",
                     what=f"text {i} per token")
        assert not got.embeddings[i, n:].any()  # padding rows are zeros
    mean = jt5.embed(byt5_dir, TEXTS, pooling="mean", batch_size=4, devices=one)
    first = jt5.embed(byt5_dir, TEXTS, pooling="first", batch_size=4, devices=one)
    assert_close(mean.embeddings, np.stack([r.mean(0) for r in reference]), dtype="float32",
                 check="hidden", what="mean pooling over real tokens")
    assert_close(first.embeddings, np.stack([r[0] for r in reference]), dtype="float32",
                 check="hidden", what="first-token pooling")


def test_order_is_kept_and_batching_does_not_matter(byt5_dir):
    one = [jax.devices()[0]]
    alone = np.stack([jt5.embed(byt5_dir, [t], devices=one).embeddings[0] for t in TEXTS[:4]])
    batched = jt5.embed(byt5_dir, TEXTS, batch_size=3, devices=one).embeddings
    assert_close(batched[:4], alone, dtype="float32", check="hidden", what="in input order")
    shuffled = [TEXTS[i] for i in (3, 1, 0, 2)]
    again = jt5.embed(byt5_dir, shuffled, batch_size=3, devices=one).embeddings
    assert_close(again, alone[[3, 1, 0, 2]], dtype="float32", check="hidden", what="permuted")


def test_eight_devices_equal_one(byt5_dir):
    assert jax.local_device_count() == 8
    one = jt5.embed(byt5_dir, TEXTS, pooling="none", batch_size=4, devices=[jax.devices()[0]])
    eight = jt5.embed(byt5_dir, TEXTS, pooling="none", batch_size=4)  # rounded up to 8 rows
    np.testing.assert_array_equal(eight.mask, one.mask)
    assert_close(eight.embeddings, one.embeddings, dtype="float32", check="hidden",
                 what="8 devices vs 1")


def test_encoder_only_export_truncation_and_loaded_models(byt5_dir, tmp_path):
    from jt5 import cli
    enc_dir = tmp_path / "enc"
    assert cli.main(["convert", str(byt5_dir), str(enc_dir), "--to", "hf", "--encoder-only"]) == 0
    assert "encoder" in json.dumps(json.loads((enc_dir / "config.json").read_text())).lower()
    full = jt5.embed(byt5_dir, TEXTS)
    assert_close(jt5.embed(enc_dir, TEXTS).embeddings, full.embeddings, dtype="float32",
                 check="hidden", what="encoder-only export")
    model = jt5.load(byt5_dir)  # an encoder-decoder already in memory: its encoder is used
    assert_close(jt5.embed(model, TEXTS, tokenizer="byte").embeddings, full.embeddings,
                 dtype="float32", check="hidden", what="loaded model")
    cut = jt5.embed(byt5_dir, TEXTS, max_length=8, pooling="none")
    assert cut.truncated == sum(len(t.encode()) + 1 > 8 for t in TEXTS)
    assert cut.mask.shape[1] == 8
    with pytest.raises(ValueError, match="pooling"):
        jt5.embed(byt5_dir, TEXTS, pooling="median")


def test_cli_writes_npy_and_safetensors(byt5_dir, tmp_path, capsys):
    from safetensors.numpy import load_file
    from jt5 import cli
    from tests.test_cli import assert_one_error_line, run
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS[:5]) + "\n")
    jl = tmp_path / "texts.jsonl"
    jl.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:5]))
    base = ["embed", "--model", str(byt5_dir), "--no-progress"]
    assert cli.main(base + [str(txt), "--output", str(tmp_path / "a.npy")]) == 0
    a = np.load(tmp_path / "a.npy")
    assert a.shape == (5, 32)
    assert_close(a, jt5.embed(byt5_dir, TEXTS[:5]).embeddings, dtype="float32", check="hidden",
                 what="cli npy")
    assert cli.main(base + [str(jl), "--field", "body", "--pooling", "none",
                            "--output", str(tmp_path / "b.safetensors")]) == 0
    b = load_file(str(tmp_path / "b.safetensors"))
    assert b["embeddings"].shape[:2] == b["mask"].shape and b["mask"].sum() == sum(
        len(t.encode()) + 1 for t in TEXTS[:5])
    capsys.readouterr()
    code, _, err = run(base + [str(jl), "--output", str(tmp_path / "c.npy")], capsys)
    assert_one_error_line(code, err, "texts.jsonl:1", "'text'", "--field")
    code, _, err = run(base + [str(txt), "--pooling", "none", "--output", "d.npy"], capsys)
    assert_one_error_line(code, err, "--output", ".safetensors")
    code, _, err = run(base + [str(txt), "--output", "d.txt"], capsys)
    assert_one_error_line(code, err, "--output", "d.txt")


def test_cli_inputs_are_read_as_generate_reads_them(byt5_dir, tmp_path, capsys, monkeypatch):
    """One reader (jt5.inputs): --input FILE or '-', JSONL strings or any of the text keys, or
    --field; embed keeps blank lines as rows, generate skips them; pipeline flags and bf16."""
    import io

    from safetensors.numpy import load_file

    from jt5 import cli
    from jt5.inputs import read_texts
    from tests.test_cli import assert_one_error_line, run
    jl = tmp_path / "p.jsonl"
    jl.write_text('"hi"\n\n{"prompt": "short one"}\n{"input": "x", "text": "b"}\n')
    assert read_texts(str(jl)) == ["hi", "short one", "b"]
    base = ["embed", "--model", str(byt5_dir), "--no-progress"]
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\nshort one\n"))
    out = tmp_path / "e.safetensors"
    assert cli.main(base + ["--input", "-", "--pooling", "none", "--padding", "max_length",
                            "--max-length", "24", "--no-attention-mask", "--output-dtype",
                            "bfloat16", "--output", str(out)]) == 0
    got = load_file(str(out))
    want = jt5.embed(byt5_dir, ["hi", "", "short one"], pooling="none", max_length=24,
                     padding="max_length", use_attention_mask=False, output_dtype="bfloat16")
    assert got["embeddings"].shape == (3, 24, 32) and str(got["embeddings"].dtype) == "bfloat16"
    np.testing.assert_array_equal(got["embeddings"], want.embeddings)
    capsys.readouterr()
    code, _, err = run(base + ["--input", str(jl), "--output", str(tmp_path / "e.npy"),
                               "--output-dtype", "bfloat16"], capsys)
    assert_one_error_line(code, err, "--output", "bfloat16", ".safetensors")
    code, _, err = run(base + [str(jl), "--field", "body", "--output", "x.npy"], capsys)
    assert_one_error_line(code, err, "p.jsonl:1", "'body'")
    gen = ["generate", "--model", str(byt5_dir), "--tokenizer", "byte", "--max-new-tokens", "3"]
    assert cli.main(gen + ["--input", str(jl), "--weights", "int8"]) == 0
    assert len(capsys.readouterr().out.rstrip("\n").split("\n")) == 3  # bytes may be \x0b
    code, _, err = run(gen + ["hello", "--field", "text"], capsys)
    assert_one_error_line(code, err, "--field", "--input")
