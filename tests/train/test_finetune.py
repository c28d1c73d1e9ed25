"""train/finetune.py + train/pairs.py: files and their errors, packing isolation, learning a copy
task to high exact match, exact resume, keep-best, and ``jt5 finetune``."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest

from jt5.tokenizer import load_tokenizer
from tests.conftest import assert_close
from tests.train.test_loop import reproducible
from tests.train.test_step import micro_config
from jt5.train import finetune, runner
from jt5.train import step as step_lib
from jt5.train.pairs import PairData, PairsConfig, read_records

BYTE = load_tokenizer("byte")


def words(n, seed, lo=3, hi=7, alphabet=12):
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase[:alphabet]))
    return ["".join(rng.choice(letters, rng.integers(lo, hi + 1))) for _ in range(n)]


def write_jsonl(path, pairs, fields=("input", "target")):
    path.write_text("".join(json.dumps(dict(zip(fields, p))) + "\n" for p in pairs))
    return path


@pytest.fixture(scope="module")
def copy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("copy")
    train = words(3000, seed=0, lo=2, hi=4)
    held = [w for w in words(400, seed=1, lo=2, hi=4) if w not in set(train)][:64]
    return (write_jsonl(d / "train.jsonl", [(w, w) for w in train]),
            write_jsonl(d / "eval.jsonl", [(w, w) for w in held]))


# -- files ------------------------------------------------------------------------------------
def test_jsonl_csv_tsv_read_the_same_pairs(tmp_path):
    pairs = [("a, \"b\"", "x\ty"), ("héllo", "wörld")]
    write_jsonl(tmp_path / "p.jsonl", pairs, ("src", "tgt"))
    import csv
    for ext, delim in ((".csv", ","), (".tsv", "\t")):
        with open(tmp_path / f"p{ext}", "w", newline="") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["tgt", "src"])
            w.writerows([(t, s) for s, t in pairs])
    for ext in (".jsonl", ".csv", ".tsv"):
        got = read_records(tmp_path / f"p{ext}", "src", "tgt")
        assert [(r.input, r.target) for r in got] == pairs, ext


@pytest.mark.parametrize("content, name, needles", [
    ('{"input": "a", "target": "b"}\n\n{"input": "c"}\n', "x.jsonl", ["x.jsonl:3", "'target'",
                                                                     "--target-field"]),
    ('{"input": "a", "target": 3}\n', "x.jsonl", ["x.jsonl:1", "'target'", "int"]),
    ("[1, 2]\n", "x.jsonl", ["x.jsonl:1", "JSON object"]),
    ("{oops\n", "x.jsonl", ["x.jsonl:1", "not JSON"]),
    ("src,target\na,b\n", "x.csv", ["x.csv:1", "'input'", "--input-field"]),
    ("", "x.jsonl", ["x.jsonl", "empty"]),
    ("a\tb\n", "x.txt", ["x.txt", "unknown extension"]),
])
def test_bad_files_name_file_line_and_field(tmp_path, content, name, needles):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError) as e:
        read_records(tmp_path / name, "input", "target")
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_truncation_is_counted_and_keeps_eos(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [("x" * 30, "y" * 3), ("a", "b" * 20), ("c", "d")])
    data = PairData(PairsConfig(data=str(f), inputs_length=8, targets_length=8, batch_size=2,
                                prefix="p: "), BYTE)
    s = data.stats()
    assert (s["truncated_inputs"], s["truncated_targets"]) == (1, 1)
    assert all(len(x) <= 8 and x[-1] == BYTE.eos_id for x in data.train.inputs)
    assert BYTE.decode(data.train.inputs[2]) == "p: c"  # the prefix is part of the input


def test_batches_are_a_pure_function_of_the_step_and_cover_every_example(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [(w, w[::-1]) for w in words(50, seed=3)])
    cfg = PairsConfig(data=str(f), inputs_length=24, targets_length=24, batch_size=4)
    a, b = PairData(cfg, BYTE), PairData(cfg, BYTE)
    for step in (7, 0, 7, 30):
        for k, v in a.batch(step).items():
            np.testing.assert_array_equal(v, b.batch(step)[k], err_msg=f"{k} at {step}")
    seen = [a.batch(s)["encoder_segment_ids"].max(axis=1).sum() for s in range(len(a.rows) // 4)]
    assert a.stats()["examples_per_row"] > 1.5 and sum(seen) <= 50
    # two hosts split the same global batch
    h = [PairData(cfg, BYTE, process_index=i, process_count=2).batch(5) for i in range(2)]
    whole = a.batch(5)
    for k in whole:
        np.testing.assert_array_equal(np.concatenate([h[0][k], h[1][k]]), whole[k], err_msg=k)


def test_packed_examples_never_see_each_other(tmp_path):
    """The eval loss of the same examples is the same packed or one per row."""
    import jax
    from flax import nnx
    import jt5
    f = write_jsonl(tmp_path / "t.jsonl", [(w, w[::-1]) for w in words(24, seed=4)])
    losses = []
    model = jt5.init_model(micro_config(), seed=0)
    graphdef, state = nnx.split(model)
    ev = jax.jit(step_lib.make_eval_step(graphdef, step_lib.OptimConfig()))
    for pack in (True, False):
        data = PairData(PairsConfig(data=str(f), eval_data=str(f), inputs_length=32,
                                    targets_length=32, batch_size=24, pack=pack), BYTE)
        (rows,) = data.eval_rows()
        assert (rows["encoder_segment_ids"].max() > 1) == pack
        losses.append(float(ev(nnx.to_pure_dict(state), rows)["loss"]))
    assert_close(losses[0], losses[1], dtype="float32", check="logits", what="packed vs padded")


# -- training ---------------------------------------------------------------------------------
def ft_config(out, data, eval_data, **kw):
    base = dict(model="tiny", out=str(out), data=str(data), eval_data=eval_data and str(eval_data), steps=100,
                batch_size=32, inputs_length=24, targets_length=12, eval_every=50, save_every=50,
                progress=False, optim=step_lib.OptimConfig(lr=2e-3, warmup_steps=20,
                                                           total_steps=100))
    base.update(kw)
    return finetune.FinetuneConfig(**base)


@pytest.fixture(scope="module")
def copy_run(copy_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("copy_run")
    return out, finetune.run(ft_config(out, *copy_files, keep_best=True))


def test_copy_task_learns_and_evaluates(copy_run):
    """100 steps of copying 2-4 letter strings: the loss falls from ~ln(384) to under a fifth,
    held-out tokens are mostly right. (High exact match takes longer: the slow test below; a
    tiny T5 from scratch learns the letters first and their order, from relative positions
    alone, later.)"""
    out, result = copy_run
    h = result.history
    assert h[-1]["loss"] < 0.2 * h[0]["loss"], (h[0]["loss"], h[-1]["loss"])
    assert h[-1]["eval_accuracy"] > 0.5, h[-1]
    lines = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert len(lines) == 64 and lines[0]["where"].endswith("eval.jsonl:1")
    assert sum(x["exact_match"] for x in lines) / 64 == result.eval["exact_match"]
    evals = [x for x in runner.read_metrics(out) if "eval_loss" in x]
    assert [x["step"] for x in evals] == [50, 100]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["eval_loss"] == min(x["eval_loss"] for x in evals)
    assert (out / "hf" / "tokenizer_config.json").is_file()


def test_chrf_matches_known_values():
    assert finetune.chrf(finetune.chrf_stats("abc", "abc")) == 100.0
    assert finetune.chrf(finetune.chrf_stats("xyz", "abc")) == 0.0
    # hyp "ab" vs ref "abc": 1-grams P=1 R=2/3, 2-grams P=1 R=1/2 -> P=1, R=7/12
    p, r = 1.0, 7 / 12
    assert finetune.chrf(finetune.chrf_stats("a b", "abc")) == pytest.approx(
        100 * 5 * p * r / (4 * p + r))


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted_run(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [(w, w[::-1]) for w in words(200, seed=5)])
    kw = dict(model=micro_config(), eval_fraction=0.1, steps=8, batch_size=8,
              inputs_length=24, targets_length=16, eval_every=3, save_every=2, export=False,
              mesh="data=2,fsdp=2,tensor=2",
              optim=step_lib.OptimConfig(warmup_steps=2, total_steps=8))
    ref = finetune.run(ft_config(tmp_path / "ref", f, None, **kw))

    def crash_at_5(step, line):
        if step == 5:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        finetune.run(ft_config(out, f, None, **kw), on_step=crash_at_5)
    again = finetune.run(ft_config(out, f, None, **kw))
    assert again.start_step == 4 and [x["step"] for x in again.history] == [5, 6, 7, 8]
    got, want = runner.read_metrics(out), runner.read_metrics(ref.out)
    assert [x["step"] for x in got] == list(range(1, 9))
    assert reproducible(got) == reproducible(want)
    assert "eval_loss" in got[5] and "eval_loss" not in got[4]


# -- the command ------------------------------------------------------------------------------
def test_cli_errors_are_one_line(copy_files, tmp_path, capsys):
    from tests.test_cli import assert_one_error_line, run
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"src": "c", "target": "d"}\n')
    base = ["finetune", "--model", "tiny", "--out", str(tmp_path / "o"), "--no-progress"]
    code, _, err = run(base + ["--data", str(bad)], capsys)
    assert_one_error_line(code, err, "bad.jsonl:2", "'input'", "--input-field")
    code, _, err = run(base + ["--data", str(copy_files[0]), "--keep-best"], capsys)
    assert_one_error_line(code, err, "--keep-best")
    code, _, err = run(base + ["--data", str(tmp_path / "none.csv")], capsys)
    assert_one_error_line(code, err, "none.csv")


def test_cli_finetunes_and_prints_the_summary(copy_files, tmp_path, capsys):
    from jt5 import cli
    out = tmp_path / "cli"
    argv = ["finetune", "--model", "tiny", "--tokenizer", "byte", "--data", str(copy_files[0]),
            "--eval-data", str(copy_files[1]), "--steps", "4", "--batch-size", "8",
            "--inputs-length", "16", "--targets-length", "4", "--eval-every", "2",
            "--out", str(out), "--no-progress", "--seed", "1", "--lr", "1e-3",
            "--save-every", "2", "--mesh", "data=8"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("finetune tiny: ") and "truncated" in text
    assert "eval: 64 examples, exact match" in text
    assert (out / "eval.jsonl").is_file() and (out / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_copy_task_reaches_high_exact_match(tmp_path):
    """The long run: copying held-out 2-4 letter strings (a-z, as in RESULTS.md's fine-tuning
    entry) to exact match >= 0.9. What a tiny T5 still gets wrong after 2000 steps is doubled
    letters (``pnni -> pni``): with relative positions only, counting a repeat is learnt last.
    Over 12 letters a quarter of the strings have one, and it plateaus at ~0.8 (loss ~0.05);
    over 26 the loss reaches ~2e-4 and exact match ~0.97."""
    train = words(3000, seed=0, lo=2, hi=4, alphabet=26)
    held = [w for w in words(400, seed=1, lo=2, hi=4, alphabet=26) if w not in set(train)][:64]
    files = (write_jsonl(tmp_path / "train.jsonl", [(w, w) for w in train]),
             write_jsonl(tmp_path / "eval.jsonl", [(w, w) for w in held]))
    result = finetune.run(ft_config(tmp_path / "long", *files, steps=2000, eval_every=500,
                                    save_every=500, targets_length=24, optim=step_lib.OptimConfig(
                                        lr=2e-3, warmup_steps=50, total_steps=2000)))
    assert result.eval["exact_match"] >= 0.9, result.eval
