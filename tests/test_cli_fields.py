"""jt5/cli/fields.py: pretrain and finetune flags come from one table that matches the configs."""
import dataclasses

import pytest

from jt5.cli import command, fields
from jt5.cli.common import Parser

REQUIRED = {"pretrain": [], "finetune": ["--model", "tiny", "--data", "pairs.jsonl"]}


def _parser(job, full=False):
    p = Parser(prog=f"jt5 {job}")
    (command(job).add if full else lambda q: fields.add_flags(q, job))(p)
    return p


@pytest.mark.parametrize("job", fields.JOBS)
def test_every_config_field_has_a_flag(job):
    from jt5.train.step import OptimConfig
    cls = fields.config_class(job)
    table = {r.field for r in fields.rows(job) if r.field}
    beside = {a.dest for a in _parser(job, full=True)._actions}  # a job module's own flags
    missing = {f.name for f in dataclasses.fields(cls)} - table - beside - fields.PYTHON_ONLY[job]
    assert not missing, f"{job}: config fields without a flag: {sorted(missing)}"
    optim = {f.name for f in dataclasses.fields(OptimConfig)} - fields.OPTIM_DERIVED
    assert {f"optim.{n}" for n in optim} <= table, optim - {t[6:] for t in table}
    flags = [r.flag for r in fields.rows(job)]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("job", fields.JOBS)
def test_defaults_are_the_configs_unless_the_table_says_so(job):
    cls = fields.config_class(job)
    cli = fields.build(_parser(job).parse_args(REQUIRED[job]), job)
    py = cls(**{f: getattr(cli, f) for f in ("model", "data")})  # the Python API's defaults
    for row in fields.rows(job):
        if not row.field or row.field in ("model", "data") or job in row.cli_default:
            continue
        if row.field.startswith("optim."):
            name = row.field[6:]
            assert getattr(cli.optim, name) == getattr(py.optim, name), row.flag
        else:
            assert getattr(cli, row.field) == getattr(py, row.field), row.flag
    assert cli.optim.total_steps == cli.steps


def test_flags_reach_the_config():
    args = _parser("pretrain").parse_args(
        ["--data", "c4/:0.7", "code.jsonl:0.3", "--lr", "0.5", "--scan-layers", "--no-pack",
         "--min-chunk", "0.2", "--optimizer", "adafactor", "--accum", "2", "--no-export",
         "--dropout", "0.1", "--samples", "3", "--text-field", "content"])
    cfg = fields.build(args, "pretrain")
    assert cfg.data == ("c4/:0.7", "code.jsonl:0.3") and cfg.text_field == "content"
    assert (cfg.optim.lr, cfg.optim.optimizer, cfg.optim.accum_steps) == (0.5, "adafactor", 2)
    assert cfg.scan_layers and not cfg.pack and not cfg.export and cfg.min_chunk == 0.2
    assert cfg.dropout_rate == 0.1 and cfg.samples_per_kind == 3
    ft = fields.build(_parser("finetune").parse_args(REQUIRED["finetune"] + [
        "--schedule", "linear", "--remat", "full", "--keep-best"]), "finetune")
    assert ft.optim.schedule == "linear" and ft.remat == "full" and ft.keep_best
    assert ft.optim.lr == 1e-3 and ft.optim.warmup_steps == 30 and ft.out == "runs/finetune"
    with pytest.raises(SystemExit):
        _parser("pretrain").parse_args(["--min-chunk", "0"])
