"""train/loop.py + train/checkpoint.py: resume, reshard, atomicity, NaN, multi-host, export, CLI.

The runs use a one-layer d_model=32 T5 on short packed rows so each compiles in seconds; the
uninterrupted reference run is shared by the tests that compare against it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import assert_close
from tests.train.test_step import micro_config
from jt5.train import checkpoint as ckpt_lib
from jt5.train import loop
from jt5.train import step as step_lib

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def loop_config(out, **kw) -> loop.LoopConfig:
    base = dict(model=micro_config(), out=str(out), steps=STEPS, batch_size=8, inputs_length=48,
                targets_length=16, save_every=2, keep=5, export=False, progress=False,
                optim=step_lib.OptimConfig(warmup_steps=2, total_steps=STEPS),
                samples_per_kind=1, max_new_tokens=8)
    base.update(kw)
    return loop.LoopConfig(**base)


def reproducible(lines):
    return [{k: v for k, v in line.items() if k not in loop.TIMING_KEYS} for line in lines]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted run to STEPS (all 8 devices on data), exported to transformers."""
    out = tmp_path_factory.mktemp("reference")
    result = loop.run(loop_config(out, export=True))
    return out, result


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted_run(reference_run, tmp_path):
    ref_out, ref = reference_run
    out = tmp_path / "run"

    def crash_at_5(step, line):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        loop.run(loop_config(out), on_step=crash_at_5)
    assert len(loop.read_metrics(out)) == 5                  # lines past the last save (4) exist
    ckpts = out / "checkpoints"
    assert ckpt_lib.complete_steps(ckpts) == [2, 4]
    # A crash in the middle of saving step 5: orbax's temporary directory, and a step directory
    # cut short (no commit markers). Neither may be read.
    shutil.copytree(ckpts / "4", ckpts / "5.orbax-checkpoint-tmp-1234")
    shutil.copytree(ckpts / "4", ckpts / "5")
    (ckpts / "5" / "commit_success.txt").unlink()
    (ckpts / "5" / "state" / "commit_success.txt").unlink()

    with pytest.raises(ValueError, match=r"another model \(differs in \['d_ff'\]\)"):
        loop.run(loop_config(out, model=micro_config(d_ff=96)))
    result = loop.run(loop_config(out))                      # the same command again
    assert result.start_step == 4
    assert [line["step"] for line in result.history] == [5, 6]
    assert reproducible(loop.read_metrics(out)) == reproducible(loop.read_metrics(ref_out))
    assert not (ckpts / "5.orbax-checkpoint-tmp-1234").exists()
    assert any(p.name.startswith("5.incomplete-") for p in ckpts.iterdir())
    assert ckpt_lib.complete_steps(ckpts) == [2, 4, 6]


def test_restore_onto_another_mesh_continues_the_same(reference_run, tmp_path):
    """Saved on data=8, resumed on data=2 x fsdp=2 x tensor=2: same continuation (float32)."""
    ref_out, _ = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out, ignore=shutil.ignore_patterns("6", "hf", "samples.txt"))
    result = loop.run(loop_config(out, mesh="data=2,fsdp=2,tensor=2"))
    assert result.start_step == 4
    ref = {line["step"]: line for line in loop.read_metrics(ref_out)}
    for line in result.history:
        for k in ("loss", "cross_entropy", "accuracy", "grad_norm"):
            assert_close(line[k], ref[line["step"]][k], dtype="float32", check="logits",
                         what=f"step {line['step']} {k}")
        assert line["learning_rate"] == ref[line["step"]]["learning_rate"]
    resharded = loop.read_metrics(out)
    assert [line["step"] for line in resharded] == list(range(1, STEPS + 1))


def test_incomplete_checkpoints_are_set_aside(tmp_path):
    d = tmp_path / "checkpoints"
    ck = ckpt_lib.Checkpoints(d, keep=5)
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    for s in (1, 2):
        ck.save(s, jax.tree.map(lambda x: x + s, state), {"note": s})
    ck.close()
    shutil.copytree(d / "2", d / "3")
    (d / "3" / "data" / "commit_success.txt").unlink()       # cut short
    shutil.copytree(d / "2", d / "4.orbax-checkpoint-tmp-99")  # crash before the rename
    ck = ckpt_lib.Checkpoints(d, keep=5)
    assert ck.latest_step() == 2
    restored, meta = ck.restore(2, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 2)
    assert meta["note"] == 2 and meta["step"] == 2
    ck.save(3, state, {"note": 3})                           # the step number is free again
    ck.close()
    assert ckpt_lib.complete_steps(d) == [1, 2, 3]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_step_in_flight_and_resumes_the_same(signum, reference_run, tmp_path,
                                                              capsys):
    """SIGINT/SIGTERM as step 4's metrics are read (saves every 3): step 5 is already in flight
    (metrics are read one step behind), so the loop finishes it, saves step 5 — off the
    --save-every grid — and stops with Interrupted; the same run again resumes from 5 and ends
    exactly as the reference (saved every 2: the cadence does not change the numbers)."""
    ref_out, _ = reference_run
    out = tmp_path / "run"

    def signal_at_4(step, line):
        if step == 4:
            os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)
    with pytest.raises(loop.Interrupted, match="resume from step 5") as e:
        loop.run(loop_config(out, save_every=3), on_step=signal_at_4)
    assert e.value.exit_code == 128 + signum and e.value.step == 5
    assert ckpt_lib.complete_steps(out / "checkpoints") == [3, 5]
    assert signal.getsignal(signum) is before  # the loop's handler is gone again
    capsys.readouterr()
    result = loop.run(loop_config(out, save_every=3))
    assert result.start_step == 5 and "resuming from step 5" in capsys.readouterr().out
    assert reproducible(loop.read_metrics(out)) == reproducible(loop.read_metrics(ref_out))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    make = step_lib.make_train_step

    def poisoned(*args, **kw):
        inner = make(*args, **kw)

        def train_step(state, batch):  # from update 3 on, the loss and the weights go NaN
            new, metrics = inner(state, batch)
            bad = new.step >= 3
            metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
            params = jax.tree.map(lambda p: jnp.where(bad, jnp.nan, p), new.params)
            return new._replace(params=params), metrics
        return train_step

    monkeypatch.setattr(step_lib, "make_train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss nan at step 3: stopping the "
                                                 r"run; the last good checkpoint is step 2"):
        loop.run(loop_config(out))
    assert ckpt_lib.complete_steps(out / "checkpoints") == [2]
    assert [line["step"] for line in loop.read_metrics(out)] == [1, 2]
    from jt5.weights import model_params
    params = model_params(ckpt_lib.load_model_from_run(out))
    assert all(np.isfinite(w).all() for w in params.values())


def test_export_loads_in_transformers_with_the_same_logits(reference_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref_out, _ = reference_run
    hf_dir = ref_out / "hf"
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert type(tok).__name__ == "ByT5Tokenizer"
    assert tok("hi").input_ids == [107, 108, 1]
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_124>"]) == [383, 259]  # as trained
    assert {oct(f.stat().st_mode & 0o777) for f in hf_dir.iterdir()} <= {"0o644", "0o664", "0o666"}
    hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    model = ckpt_lib.load_model_from_run(ref_out, attention="xla")  # the last checkpoint
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 259, (2, 11))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    dec = rng.integers(3, 259, (2, 5))
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(dec), jnp.asarray(mask)))
    with torch.no_grad():
        theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          decoder_input_ids=torch.tensor(dec)).logits.numpy()
    assert_close(ours, theirs, dtype="float32", check="logits", what="exported model logits")

    from jt5.model import T5EncoderModel  # the encoder alone, read by partial restore
    enc = ckpt_lib.load_model_from_run(ref_out, T5EncoderModel, attention="xla")
    assert_close(enc(jnp.asarray(ids), jnp.asarray(mask)),
                 model.encode(jnp.asarray(ids), jnp.asarray(mask)), dtype="float32",
                 check="hidden", what="encoder-only load")

    samples = (ref_out / "samples.txt").read_text()
    assert samples.count("generated:") == 3 and "[S]" in samples

    from jt5 import cli  # jt5 convert reads a run directory through load_model_from_run
    assert cli.main(["convert", str(ref_out), str(tmp_path / "conv")]) == 0
    from jt5.bridge import hf
    a = hf.StateDict(tmp_path / "conv")
    b = hf.StateDict(hf_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the tokenizer came along
        assert (tmp_path / "conv" / name).read_bytes() == (hf_dir / name).read_bytes()


def test_generate_and_load_accept_a_run_directory(reference_run, tmp_path, capsys):
    """A run directory is a model source like the others, for `jt5 generate` and `jt5.load`,
    with the tokenizer it trained with even before the export exists."""
    import jt5
    from jt5 import cli
    ref_out, _ = reference_run
    argv = ["generate", "--max-new-tokens", "4", "hello<extra_id_0>"]
    assert cli.main(argv[:1] + ["--model", str(ref_out)] + argv[1:]) == 0
    via_run = capsys.readouterr().out
    assert cli.main(argv[:1] + ["--model", str(ref_out / "hf")] + argv[1:]) == 0
    assert capsys.readouterr().out == via_run and via_run.strip()
    bare = tmp_path / "bare"  # no hf/ export: the checkpoint's data config names the tokenizer
    shutil.copytree(ref_out, bare, ignore=shutil.ignore_patterns("hf", "samples.txt"))
    from jt5.formats import locate
    assert locate(bare).tokenizer == "byte"
    model = jt5.load(bare, attention="xla")
    assert isinstance(model, jt5.T5ForConditionalGeneration)


def test_cli_continues_from_the_exported_directory_on_a_2x2x2_mesh(reference_run, tmp_path):
    """``jt5 pretrain --model OUT/hf``: weights (and the ByT5 tokenizer) load onto the mesh."""
    from jt5 import cli
    ref_out, _ = reference_run
    out = tmp_path / "continued"
    argv = ["pretrain", "--model", str(ref_out / "hf"), "--out", str(out), "--steps", "2",
            "--batch-size", "8", "--inputs-length", "48", "--targets-length", "16", "--warmup", "1",
            "--mesh", "data=2,fsdp=2,tensor=2", "--no-export", "--no-progress", "--tensorboard"]
    assert cli.main(argv) == 0
    lines = loop.read_metrics(out)
    assert [line["step"] for line in lines] == [1, 2]
    # step 1's loss is the exported weights' loss on batch 0 (computed here on one device)
    from flax import nnx
    from jt5.train.data import Pipeline
    model = ckpt_lib.load_model_from_run(ref_out, attention="xla")
    graphdef, state = nnx.split(model)
    batch = Pipeline(loop.data_config(loop_config(out))).batch(0)
    want = jax.jit(step_lib.make_eval_step(graphdef, step_lib.OptimConfig()))(
        nnx.to_pure_dict(state), batch)["loss"]
    assert_close(lines[0]["loss"], want, dtype="float32", check="logits", what="step-1 loss")
    assert any((out / "tensorboard").iterdir())
    meta = ckpt_lib.read_meta(out / "checkpoints" / "2")
    assert meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert meta["data_config"]["tokenizer"] == str(ref_out / "hf")


def test_cli_pretrain_help_lists_the_flags(capsys):
    from jt5 import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrain", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = ("--model", "--data", "--tokenizer", "--steps", "--batch-size", "--inputs-length",
             "--targets-length", "--mesh", "--out", "--seed", "--save-every", "--keep", "--lr",
             "--warmup", "--schedule", "--optimizer", "--dtype", "--remat", "--accum", "--z-loss",
             "--clip", "--attention", "--pack", "--no-pack", "--tensorboard", "--coordinator",
             "--num-processes", "--process-id", "--eval-every")
    missing = [f for f in flags if f not in text]
    assert not missing, missing
    assert "(default 800)" in text and "runs/pretrain" in text


def _cli_command(out):
    return [sys.executable, "-m", "jt5.cli", "pretrain", "--out", str(out), "--steps", "12",
            "--batch-size", "8", "--inputs-length", "48", "--targets-length", "16",
            "--save-every", "3", "--warmup", "2", "--no-export", "--no-progress"]


_CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def whole_cli_run(tmp_path_factory):
    """``jt5 pretrain`` (12 steps) uninterrupted, in a subprocess."""
    out = tmp_path_factory.mktemp("cli") / "whole"
    subprocess.run(_cli_command(out), env=_CLI_ENV, check=True, capture_output=True)
    return out


def _signal_after(out, signum, lines: int) -> subprocess.Popen:
    """Start ``jt5 pretrain`` into ``out`` and send ``signum`` once ``lines`` metrics exist."""
    import time
    victim = subprocess.Popen(_cli_command(out), env=_CLI_ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            victim.send_signal(signum)
            break
        time.sleep(0.05)
    return victim


@pytest.mark.slow
def test_sigkill_then_the_same_command_resumes_exactly(whole_cli_run, tmp_path):
    """A real crash: ``jt5 pretrain`` killed with SIGKILL mid-run (possibly mid-save), then the
    same command again: metrics.jsonl equals an uninterrupted run's."""
    command = _cli_command
    env = _CLI_ENV
    victim = _signal_after(tmp_path / "killed", signal.SIGKILL, 7)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = subprocess.run(command(tmp_path / "killed"), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import re
    resumed = re.search(r"steps (\d+)->12", done.stdout)
    assert resumed and int(resumed.group(1)) in (3, 6, 9), done.stdout
    assert (reproducible(loop.read_metrics(tmp_path / "killed")) ==
            reproducible(loop.read_metrics(whole_cli_run)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_the_same_command_resumes(signum, whole_cli_run, tmp_path):
    """``jt5 pretrain`` gets SIGINT / SIGTERM mid-run: it saves the step in flight, says where to
    resume, exits 128 + signal; the same command resumes there and ends as an uninterrupted run."""
    import re
    out = tmp_path / "stopped"
    victim = _signal_after(out, signum, 5)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode == 128 + signum, (victim.returncode, err[-3000:])
    said = re.search(r"resume from step (\d+)", err)
    assert said, err[-3000:]
    step = int(said.group(1))
    assert 5 <= step < 12 and step in ckpt_lib.complete_steps(out / "checkpoints")
    assert "Traceback" not in err
    done = subprocess.run(_cli_command(out), env=_CLI_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from step {step}" in done.stdout, done.stdout
    assert reproducible(loop.read_metrics(out)) == reproducible(loop.read_metrics(whole_cli_run))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_train_together(tmp_path):
    """Two jax processes (2 CPU devices each) on loopback: one 4-device mesh, each feeding its own
    rows; they agree on every metric, checkpoint together, and process 0 exports."""
    port = _free_port()
    worker = Path(__file__).with_name("multiprocess_worker.py")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-4000:]
    h0, h1 = (json.loads((tmp_path / f"history_{i}.json").read_text()) for i in range(2))
    assert [line["step"] for line in h0] == [1, 2, 3]
    assert reproducible(h0) == reproducible(h1)
    assert all(np.isfinite(line["loss"]) for line in h0)
    assert h0[0]["target_tokens"] > 0
    run = tmp_path / "run"
    assert ckpt_lib.complete_steps(run / "checkpoints") == [2, 3]
    assert [line["step"] for line in loop.read_metrics(run)] == [1, 2, 3]
    assert (run / "hf" / "model.safetensors").is_file() and (run / "samples.txt").is_file()
    meta = ckpt_lib.read_meta(run / "checkpoints" / "3")
    assert meta["process_count"] == 2 and meta["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}


def test_loop_config_fields_cover_the_cli():
    """Every LoopConfig field is reachable from a flag (or is Python-only by design)."""
    python_only = {"progress", "export", "async_checkpoints", "samples_per_kind", "optim"}
    names = {f.name for f in dataclasses.fields(loop.LoopConfig)} - python_only
    import argparse
    from jt5.cli import pretrain
    p = argparse.ArgumentParser()
    pretrain.add(p)
    dests = {a.dest for a in p._actions} | {"dropout_rate"}
    assert names <= dests | {"model"}, names - dests
