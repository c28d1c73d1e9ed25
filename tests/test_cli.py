"""The ``jt5`` command as a new user meets it: one-line errors, flags, tokenizer files that
travel with ``convert``, file modes, ``generate`` output. Every case runs through ``cli.main``."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jt5 import cli

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """``cli.main(argv)`` -> (exit code, stdout, stderr), whether it returns or exits."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), f"exit code {code}; stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["pretrain", "--steps", "-5"], ["--steps", "-5"]),
    (["pretrain", "--batch-size", "0"], ["--batch-size"]),
    (["pretrain", "--lr", "nan?"], ["--lr", "nan?"]),
    (["generate", "--model", "x", "--max-new-tokens", "0", "hi"], ["--max-new-tokens", "0"]),
    (["generate", "--model", "x", "--top-p", "1.5", "hi"], ["--top-p", "1.5"]),
    (["pretrain", "--no-such-flag"], ["--no-such-flag"]),
])
def test_flag_ranges_are_checked_by_argparse(argv, needles, capsys):
    code, _, err = run(argv, capsys)
    line = assert_one_error_line(code, err, *needles)
    assert code == 2 and "accum_steps" not in line and "total_steps" not in line


def test_bad_inputs_give_one_error_line(tmp_path, byt5_dir, capsys):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 4)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in byt5_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes((byt5_dir / "model.safetensors").read_bytes()[:999])
    out = tmp_path / "out"
    cases = [
        (["convert", "/nonexistent", str(out)], ["/nonexistent does not exist"]),
        (["convert", str(tmp_path), str(out)], [str(tmp_path), "neither"]),
        (["convert", str(corrupt), str(out)], ["model.safetensors"]),
        (["generate", "--model", str(corrupt), "hi"], ["model.safetensors"]),
        (["generate", "--model", str(tmp_path / "missing"), "hi"], ["--model", "does not exist"]),
        (["generate", "--model", str(byt5_dir), ""], ["TEXT 1 is empty"]),
        (["generate", "--model", str(byt5_dir), "--num-return-sequences", "2", "hi"],
         ["--num-return-sequences 2"]),
        (["convert", str(byt5_dir), str(out), "--max-shard-size", "lots"], ["--max-shard-size"]),
        (["pretrain", "--model", "t5-nope", "--out", str(out)], ["--model", "t5-nope", "tiny"]),
        (["pretrain", "--mesh", "data=64", "--out", str(out)], ["--mesh data=64", "64 devices"]),
        (["pretrain", "--data", str(empty), "--out", str(out)], ["--data", str(empty)]),
        (["pretrain", "--data", str(binary), "--out", str(out)], [str(binary), "UTF-8"]),
        (["pretrain", "--data", str(tmp_path / "nope.txt"), "--out", str(out)], ["nope.txt"]),
        (["pretrain", "--tokenizer", str(tmp_path / "nope"), "--out", str(out)], ["--tokenizer"]),
    ]
    for argv, needles in cases:
        code, _, err = run(argv, capsys)
        assert code == 1, (argv, err)
        assert_one_error_line(code, err, *needles)
        # a run that failed before its first save leaves no (empty) checkpoints directory
        assert not (out / "checkpoints").exists(), argv


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "convert", "/nonexistent", str(tmp_path / "o")])
    monkeypatch.setenv("JT5_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["convert", "/nonexistent", str(tmp_path / "o")])


def test_console_script_error_is_one_line_and_nonzero(tmp_path):
    """The real process: no traceback on stderr, non-zero exit status."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "jt5.cli", "convert", "/nonexistent",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == ["error: /nonexistent does not exist"], p.stderr


# -- help, version ----------------------------------------------------------------------------
def test_version_and_model_help_lists_presets(capsys):
    import jt5
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"jt5 {jt5.__version__}"
    from jt5.cli.common import preset_names
    assert preset_names() == tuple(jt5.PRESETS)
    code, out, _ = run(["pretrain", "--help"], capsys)
    assert code == 0
    flat = " ".join(out.split())
    assert all(name in flat for name in jt5.PRESETS), flat
    code, out, _ = run(["generate", "--help"], capsys)
    assert "--show-special-tokens" in out and "run directory" in " ".join(out.split())


# -- convert ------------------------------------------------------------------------------------
def _modes(directory):
    return {str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode)
            for p in Path(directory).rglob("*") if p.is_file()}


def test_convert_carries_tokenizer_files_and_writes_normal_modes(tmp_path, byt5_dir, capsys):
    """HF (with spiece.model, a binary file) -> jt5 -> HF: tokenizer files arrive byte for
    byte, every file gets the umask's mode, and the result loads in generate / AutoTokenizer."""
    transformers = pytest.importorskip("transformers")
    from tests.test_tokenizer import _spm_dir
    src = tmp_path / "src"
    src.mkdir()
    for f in byt5_dir.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (src / f.name).write_bytes(f.read_bytes())
    (tmp_path / "spm").mkdir()
    spm = _spm_dir(tmp_path / "spm")
    tok_names = sorted(f.name for f in spm.iterdir())
    for f in spm.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    old = os.umask(0o022)
    try:
        assert run(["convert", str(src), str(tmp_path / "jt5")], capsys)[0] == 0
        assert run(["convert", str(tmp_path / "jt5"), str(tmp_path / "hf")], capsys)[0] == 0
    finally:
        os.umask(old)
    for d in ("jt5", "hf"):
        for name in tok_names:
            assert (tmp_path / d / name).read_bytes() == (src / name).read_bytes(), (d, name)
        modes = _modes(tmp_path / d)
        assert modes and set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert auto.convert_tokens_to_ids("<extra_id_0>") == 64  # spiece model: 60 pieces + 5 extra
    code, out, err = run(["generate", "--model", str(tmp_path / "jt5"), "--max-new-tokens", "3",
                          "the fox"], capsys)
    assert code == 0 and len(out.splitlines()) == 1, err


def test_export_modes_follow_the_umask(tmp_path):
    """``write_hf_dir`` renames files out of a 0700 temporary directory: their mode must still be
    what the umask gives (safetensors' writer alone makes model.safetensors 0600)."""
    from jt5.bridge.hf import write_hf_dir
    sd = {"w": np.zeros((2, 2), np.float32)}
    old = os.umask(0o027)
    try:
        write_hf_dir(tmp_path / "a", sd, {"model_type": "t5"}, extra_files={"x.json": "{}"})
    finally:
        os.umask(old)
    assert set(_modes(tmp_path / "a").values()) == {0o640}


# -- generate -----------------------------------------------------------------------------------
def test_generate_parses_prompt_specials_and_shows_blank_outputs(byt5_dir, capsys, monkeypatch):
    """The prompt's <extra_id_0> reaches the model as id 383; an output of only special tokens
    prints them instead of a blank line; --show-special-tokens prints them always."""
    import jt5.generate
    from jt5.tokenizer import ByteTokenizer
    seen = {}
    outputs = np.array([[0, 383, 382, 1, 0, 0], [0, 107, 383, 108, 1, 0]], np.int32)

    def fake_generate(model, input_ids, attention_mask, **kw):
        seen["ids"] = np.asarray(input_ids)
        return outputs

    monkeypatch.setattr(jt5.generate, "generate", fake_generate)
    code, out, _ = run(["generate", "--model", str(byt5_dir), "<extra_id_0>x", "hi"], capsys)
    assert code == 0
    assert seen["ids"][0, :3].tolist() == ByteTokenizer().encode("<extra_id_0>x", add_eos=True)
    assert out.splitlines() == ["<extra_id_0><extra_id_1></s>", "hi"]
    code, out, _ = run(["generate", "--model", str(byt5_dir), "--show-special-tokens", "a", "b"],
                       capsys)
    assert out.splitlines() == ["<extra_id_0><extra_id_1></s>", "h<extra_id_0>i</s>"]


def test_warnings_print_without_logger_names(capsys):
    """``warning: ...`` on stderr, not ``WARNING:jt5.train.loop:...``; info lines are bare."""
    import logging
    cli._setup_logging()
    logging.getLogger("jt5.train.loop").warning("no held-out documents: no samples")
    logging.getLogger("jt5.train.data").info("tokenised 3 documents")
    assert capsys.readouterr().err.splitlines() == [
        "warning: no held-out documents: no samples", "tokenised 3 documents"]
