"""``jt5 finetune --head``: labelled data and its errors, token alignment and answer spans, the
heads' losses against transformers' own, the metrics against scikit-learn / SQuAD's rules /
conlleval's, and one short CLI fine-tune whose export transformers loads with the same logits."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jt5.tokenizer import load_tokenizer
from jt5.train import head_tasks
from jt5.train.labels import LabelData, LabelsConfig, read_examples

BYTE = load_tokenizer("byte")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- bad data: one error naming file:line and the field ---------------------------------------
@pytest.mark.parametrize("head, rows, needles", [
    ("sequence-classification", [{"input": "a", "label": "x"}, {"input": "b", "label": [1]}],
     ["d.jsonl:2", "'label'", "list"]),
    ("sequence-classification", [{"input": "a", "label": "x"}, {"input": "b"}],
     ["d.jsonl:2", "'label'", "--label-field"]),
    ("sequence-classification", [{"input": 3, "label": "x"}], ["d.jsonl:1", "'input'", "int"]),
    ("token-classification", [{"input": ["a", "b", "c"], "label": ["O", "B-X"]}],
     ["d.jsonl:1", "'label' has 2 labels for 3 words"]),
    ("token-classification", [{"input": "a b", "label": ["O", "O"]}],
     ["d.jsonl:1", "'input'", "list of words"]),
    ("question-answering", [{"input": "q?", "context": "a cat", "label": {"text": ["cat"],
                                                                          "answer_start": [0]}}],
     ["d.jsonl:1", "'label'", "answer_start 0", "'cat'"]),
    ("question-answering", [{"input": "q?", "context": "a cat", "label": ["cat"]}],
     ["d.jsonl:1", "'label'", "answer_start"]),
    ("question-answering", [{"input": "q?", "label": {"text": ["a"], "answer_start": [0]}}],
     ["d.jsonl:1", "'context'", "--context-field"]),
])
def test_bad_label_data_names_file_line_and_field(tmp_path, head, rows, needles):
    path = jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError) as e:
        LabelData(LabelsConfig(head=head, data=path), BYTE)
    assert "\n" not in str(e.value)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_csv_header_and_a_checkpoints_labels(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhi,pos\n")
    with pytest.raises(ValueError, match=r"d.csv:1: no column 'input'.*--input-field"):
        read_examples(tmp_path / "d.csv", LabelsConfig(head="sequence-classification",
                                                       data=str(tmp_path / "d.csv")))
    path = jsonl(tmp_path / "d.jsonl", [{"input": "a", "label": "pos"},
                                        {"input": "b", "label": "meh"}])
    with pytest.raises(ValueError, match=r"d.jsonl:2: label 'meh' is not one of the model's "
                                         r"labels \['neg', 'pos'\]"):
        LabelData(LabelsConfig(head="sequence-classification", data=path,
                               id2label=("neg", "pos")), BYTE)


def test_label_ids_alignment_and_spans(tmp_path):
    """Names sort into ids; integer labels are ids; each word's label sits on its first token;
    an answer's span decodes to the answer; batches are a pure function of the step."""
    cls = LabelData(LabelsConfig(head="sequence-classification", data=jsonl(
        tmp_path / "c.jsonl", [{"input": "x", "label": v} for v in ("pos", "neg", "pos")])), BYTE)
    assert cls.id2label == ("neg", "pos") and list(cls.train.labels) == [1, 0, 1]
    ints = LabelData(LabelsConfig(head="sequence-classification", data=jsonl(
        tmp_path / "i.jsonl", [{"input": "x", "label": v} for v in (3, "1", 0)])), BYTE)
    assert len(ints.id2label) == 4 and list(ints.train.labels) == [3, 1, 0]

    words, tags = ["Ann", "met", "Bo"], ["B-PER", "O", "B-PER"]
    tok = LabelData(LabelsConfig(head="token-classification", data=jsonl(
        tmp_path / "t.jsonl", [{"input": words, "label": tags}])), BYTE)
    ids, lab = tok.train.ids[0], tok.train.labels[0]
    assert BYTE.decode(ids) == "Ann met Bo"
    assert [tok.id2label[x] for x in lab[lab >= 0]] == tags
    assert list(np.flatnonzero(lab >= 0)) == [0, 3, 7]          # "A", " m" -> space, " B"
    assert list(tok.train.first[0]) == [0, 3, 7]

    ctx = "The cat sat on the mat. The dog ran."  # 36 bytes
    answer = {"text": ["The dog"], "answer_start": [ctx.index("The dog")]}
    qa = LabelData(LabelsConfig(head="question-answering", data=jsonl(tmp_path / "q.jsonl", [
        {"input": "Who ran?", "context": ctx, "label": answer},
        # a long question keeps half of the 48 tokens; the context is cut before the answer
        {"input": "Who was it that ran off at last?", "context": ctx, "label": answer},
    ]), inputs_length=48), BYTE)
    (s, e), row = qa.train.labels[0], qa.train.ids[0]
    assert BYTE.decode(row[s:e + 1]) == "The dog"
    assert BYTE.decode(row) == "Who ran?</s>" + ctx + "</s>" or BYTE.decode(
        row, skip_special_tokens=True) == "Who ran?" + ctx
    assert qa.train.labels[1] == (-1, -1) and len(qa.train.ids[1]) == 48
    assert qa.stats()["truncated"] == 1 and qa.stats()["unanswerable"] == 1

    again = LabelData(cls.config, BYTE)
    for step in (3, 0, 7):
        a, b = cls.batch(step), again.batch(step)
        assert all(np.array_equal(a[k], b[k]) for k in a)


# -- losses against transformers' ---------------------------------------------------------------
@pytest.mark.parametrize("head", ["sequence-classification", "token-classification",
                                  "question-answering"])
def test_losses_equal_transformers(head, tmp_path):
    """The training loss (per label weight) is transformers' ``loss`` on the same weights and
    labels: cross-entropy (token: -100 ignored; QA: mean of start and end)."""
    pytest.importorskip("transformers")
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from tests.test_heads import build_head, eos_inputs
    from jt5 import heads

    hf = build_head("t5-v1_1", head, tmp_path)
    model = heads.HEAD_CLASSES[head].from_pretrained(tmp_path, attention="xla")
    ids, mask = eos_inputs(hf.config.vocab_size)
    rng = np.random.default_rng(0)
    B, S = ids.shape
    batch = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)}
    if head == "question-answering":
        starts, ends = rng.integers(0, 10, B), rng.integers(10, 12, B)
        batch.update(start_positions=starts.astype(np.int32), end_positions=ends.astype(np.int32),
                     label_weights=np.ones(B, np.float32))
        kw = dict(start_positions=torch.as_tensor(starts), end_positions=torch.as_tensor(ends))
    elif head == "token-classification":
        labels = rng.integers(0, 3, (B, S))
        scored = (mask == 1) & (rng.random((B, S)) < 0.7)
        batch.update(labels=labels.astype(np.int32), label_weights=scored.astype(np.float32))
        kw = dict(labels=torch.as_tensor(np.where(scored, labels, -100)))
    else:
        labels = rng.integers(0, 3, B)
        batch.update(labels=labels.astype(np.int32), label_weights=np.ones(B, np.float32))
        kw = dict(labels=torch.as_tensor(labels))
    with torch.no_grad():
        ref = float(hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                       **kw).loss)
    graphdef, params = nnx.split(model)
    terms = head_tasks.task(head).forward(graphdef, params,
                                          {k: jnp.asarray(v) for k, v in batch.items()})
    ours = float(terms.cross_entropy / terms.weight)
    assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), (ours, ref)


# -- metrics ------------------------------------------------------------------------------------
def test_macro_f1_equals_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 7):
        gold, pred = rng.integers(0, n_classes, 50), rng.integers(0, n_classes, 50)
        pred[:5] = n_classes  # a class only in the predictions
        assert abs(head_tasks.macro_f1(gold, pred)
                   - metrics.f1_score(gold, pred, average="macro")) < 1e-12


def test_entity_f1_follows_conlleval():
    """Chunks as conlleval reads IOB: I-X after O or another type opens a chunk."""
    assert head_tasks.chunks(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER"]) == {
        ("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5), ("PER", 6, 6)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]  # PER cut short: 2 of 3 chunks right
    assert head_tasks.entity_f1(gold, pred) == pytest.approx(2 * 2 / (3 + 3))
    assert head_tasks.is_iob2(["O", "B-PER", "I-PER"]) and not head_tasks.is_iob2(["NOUN", "O"])


def test_squad_scores_follow_the_v1_1_script():
    assert head_tasks.squad_scores("The Cat!", ["cat"]) == (1.0, 1.0)  # case, article, punct
    em, f1 = head_tasks.squad_scores("a black cat sat", ["the cat", "black dog"])
    assert em == 0.0 and f1 == pytest.approx(max(2 * (1 / 3) * 1 / (1 / 3 + 1),
                                                 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)))
    assert head_tasks.squad_scores("", ["x"]) == (0.0, 0.0)


def test_best_span_is_the_best_valid_pair():
    rng = np.random.default_rng(1)
    s, e = rng.normal(size=20), rng.normal(size=20)
    a, b = head_tasks.best_span(s, e, 4, 15, 5)
    pairs = [(i, j) for i in range(4, 15) for j in range(i, min(i + 5, 15))]
    assert (a, b) == max(pairs, key=lambda p: s[p[0]] + e[p[1]])


# -- one short run through the CLI --------------------------------------------------------------
def test_cli_head_finetune_exports_what_transformers_loads(byt5_dir, tmp_path, capsys):
    """4 steps of sequence classification from a base checkpoint (a fresh head) over a 2x2x2
    mesh: metrics per eval, predictions per eval example, the summary line, and an export
    transformers' T5ForSequenceClassification loads with jt5's logits and predictions. (Resume
    is the runner's, tested with seq2seq; the head's batches are a pure function of the step.)"""
    pytest.importorskip("transformers")
    import torch
    import transformers

    import jt5
    from jt5 import cli
    from tests.test_cli import assert_one_error_line, run

    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(["red", "blue", "dark", "sky"], 3)),
             "y": ["cold", "warm", "hot"][i % 3]} for i in range(60)]
    data, held = jsonl(tmp_path / "d.jsonl", rows[:44]), jsonl(tmp_path / "e.jsonl", rows[44:])
    out = tmp_path / "out"
    argv = ["finetune", "--model", str(byt5_dir), "--head", "sequence-classification",
            "--data", data, "--eval-data", held, "--input-field", "text", "--label-field", "y",
            "--steps", "4", "--batch-size", "8", "--inputs-length", "24", "--eval-every", "2",
            "--save-every", "2", "--mesh", "data=2,fsdp=2,tensor=2", "--out", str(out),
            "--no-progress"]
    with pytest.warns(UserWarning, match="classification_head.out_proj.weight"):
        assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "eval: 16 examples, accuracy" in text and "; eval accuracy" in text
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert {"eval_loss", "eval_accuracy", "eval_macro_f1"} <= set(lines[3]) and (
        "eval_accuracy" not in lines[2])
    preds = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and {"where", "input", "label", "prediction", "correct"} <= set(preds[0])

    raw = json.loads((out / "hf" / "config.json").read_text())
    assert raw["architectures"] == ["T5ForSequenceClassification"]
    assert raw["id2label"] == {"0": "cold", "1": "hot", "2": "warm"}
    theirs = transformers.T5ForSequenceClassification.from_pretrained(out / "hf").eval()
    ours = jt5.load(out / "hf", attention="xla")
    enc = BYTE.encode_batch([r["text"] for r in rows[44:]])
    with torch.no_grad():
        ref = theirs(input_ids=torch.as_tensor(enc.input_ids, dtype=torch.long),
                     attention_mask=torch.as_tensor(enc.attention_mask)).logits.numpy()
    from tests.conftest import assert_close
    assert_close(ours(enc.input_ids, enc.attention_mask), ref, dtype="float32", check="logits",
                 what="exported head")
    assert [p["prediction"] for p in preds] == [raw["id2label"][str(i)] for i in ref.argmax(-1)]

    bad = jsonl(tmp_path / "bad.jsonl", [{"text": "a", "y": "cold"}, {"text": "b", "y": 1.5}])
    capsys.readouterr()
    code, _, err = run(["finetune", "--model", str(byt5_dir), "--head", "sequence-classification",
                        "--data", bad, "--input-field", "text", "--label-field", "y",
                        "--out", str(tmp_path / "o2"), "--no-progress"], capsys)
    assert_one_error_line(code, err, "bad.jsonl:2", "'y'", "float")
