"""jt5 tokenizer train: a sentencepiece unigram with T5's ids, loaded by AutoTokenizer and jt5."""
import json

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")


def test_trained_tokenizer_has_t5_ids_and_loads_everywhere(tmp_path, capsys):
    from jt5 import cli
    from jt5.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzäöü"), rng.integers(2, 9)))
             for _ in range(400)]
    with open(tmp_path / "c.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"body": " ".join(rng.choice(words, 60))}) + "\n")
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "c.jsonl"), "--out", str(out),
                     "--vocab-size", "500", "--extra-ids", "20", "--text-field", "body",
                     "--character-coverage", "1.0"]) == 0
    assert "500 pieces + 20 sentinels" in capsys.readouterr().out
    hf = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))  # the oracle
    assert len(hf) == 520 and sp.get_piece_size() == 500
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    # T5's sentinels: <extra_id_0> the top id, counting down
    assert hf.convert_tokens_to_ids([f"<extra_id_{i}>" for i in (0, 1, 19)]) == [519, 518, 500]
    text = " ".join(rng.choice(words, 30)) + " zzqx"
    assert hf(text, add_special_tokens=False).input_ids == sp.encode(text)
    jt = load_tokenizer(str(out))
    assert jt.encode(text) == sp.encode(text) and jt.extra_id(0) == 519 and jt.num_extra_ids == 20
    assert hf.decode(sp.encode(text)) == text
    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "c.jsonl"), "--out",
                     str(out), "--vocab-size", "90000", "--text-field", "body"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vocab-size 90000: sentencepiece: Vocabulary size too high" in err[0]
