"""Pretraining checkpoints: an orbax ``CheckpointManager`` over ``Composite(state, data)``.

A run directory ``OUT`` keeps its checkpoints under ``OUT/checkpoints/<step>/``::

    <step>/state/   the TrainState (params, optimizer state, step, rng): orbax StandardSave
    <step>/data/    JSON: step, data position, model / data / optimizer configs, mesh

Saves are asynchronous (device arrays are copied to host before ``save`` returns, so the next
donated step may reuse the buffers; files are written in a background thread) and atomic: orbax
writes ``<step>.orbax-checkpoint-tmp-<ts>/``, puts ``commit_success.txt`` in it and renames it into
place. A crash mid-save leaves a temporary directory, which is never read and is removed when the
run restarts. A step directory without its commit files (a copy cut short, a crash in a
non-atomic filesystem) is *moved aside* to ``<step>.incomplete-<time>`` at start, with a warning,
so the run resumes from the newest complete step instead of failing or, worse, reading it.

Restore targets an abstract state built for the *current* mesh: orbax reads each shard it needs,
so a run saved on one mesh resumes on another (different data / fsdp / tensor sizes, or a
different number of hosts) with no conversion step.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMMIT_FILE = "commit_success.txt"  # orbax writes it into the tmp dir before the rename
FORMAT = "jt5-pretrain-v1"


def checkpoint_dir(run_dir) -> Path:
    """``OUT/checkpoints`` of a run directory (a checkpoints directory itself is accepted too)."""
    run_dir = Path(run_dir).absolute()
    if (run_dir / CHECKPOINTS).is_dir() or not any(_step_of(p) is not None for p in _children(run_dir)):
        return run_dir / CHECKPOINTS
    return run_dir


def _children(d: Path):
    return list(d.iterdir()) if d.is_dir() else []


def _step_of(p: Path) -> Optional[int]:
    return int(p.name) if p.is_dir() and p.name.isdigit() else None


def is_complete(step_dir) -> bool:
    """Every piece orbax commits is there: the step's and each item's ``commit_success.txt``."""
    d = Path(step_dir)
    return all((d / sub / COMMIT_FILE).is_file() for sub in ("", "state", "data"))


def complete_steps(directory) -> list[int]:
    return sorted(s for p in _children(Path(directory)) if (s := _step_of(p)) is not None
                  and is_complete(p))


def quarantine_incomplete(directory) -> list[Path]:
    """Move step directories that are not complete out of orbax's way; returns the new paths."""
    moved = []
    for p in _children(Path(directory)):
        if _step_of(p) is not None and not is_complete(p):
            dst = p.with_name(f"{p.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(p, dst)
            log.warning("checkpoint %s is incomplete (no commit marker); moved it to %s and "
                        "ignoring it", p, dst.name)
            moved.append(dst)
    return moved


class Checkpoints:
    """Save / restore ``(TrainState, JSON metadata)`` pairs by step; keeps the newest ``keep``."""

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        # The directory is made by the first save (the manager creates it), so a run that fails
        # before saving anything leaves no empty checkpoints/ behind.
        if jax.process_index() == 0 and self.directory.is_dir():
            quarantine_incomplete(self.directory)
        _barrier("jt5-checkpoint-scan")
        self.manager = self._manager() if self.directory.is_dir() else None

    def _manager(self):
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_names=("state", "data"))

    def latest_step(self) -> Optional[int]:
        steps = [s for s in (self.manager.all_steps() if self.manager is not None else ())
                 if is_complete(self.directory / str(s))]
        return max(steps) if steps else None

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving ``state`` (a pytree of jax Arrays) and ``meta`` as ``step``; returns once
        the arrays are on the host. Call on every process."""
        meta = dict(meta, step=int(step), format=FORMAT)
        if self.manager is None:
            self.manager = self._manager()
        self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return read_meta(self.directory / str(step))

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """``abstract_state``: ShapeDtypeStructs *with shardings for the current mesh*."""
        if self.manager is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoints")
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], dict(out["data"])

    def wait(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def read_meta(step_dir) -> dict:
    f = Path(step_dir) / "data" / "metadata"
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{step_dir}: no checkpoint metadata ({f})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f}: not a jt5 pretraining checkpoint (format={meta.get('format')!r})")
    return meta


def latest_complete_step(run_dir) -> Optional[int]:
    steps = complete_steps(checkpoint_dir(run_dir))
    return steps[-1] if steps else None


def load_model_from_run(run_dir, cls=None, *, step: Optional[int] = None,
                        shardings: Optional[Callable] = None, **config_overrides):
    """The model of a pretraining run's latest complete checkpoint (or ``step``).

    Only the parameters are read (orbax partial restore), not the optimizer state.
    ``cls``: ``T5ForConditionalGeneration`` (default) or ``T5EncoderModel`` (encoder weights
    only). ``shardings``: optional ``abstract_state -> shardings`` placing parameters on a mesh;
    default: the first device. ``config_overrides``: T5Config fields (``dtype``,
    ``param_dtype``, ``attention``, ...); parameters are cast to ``param_dtype``.
    """
    from flax import nnx

    from jt5 import weights
    from jt5.bridge.native import config_from_dict
    from jt5.model import T5ForConditionalGeneration

    cls = cls or T5ForConditionalGeneration
    directory = checkpoint_dir(run_dir)
    if step is None:
        step = latest_complete_step(run_dir)
        if step is None:
            raise FileNotFoundError(f"{run_dir}: no complete pretraining checkpoint under {directory}")
    step_dir = directory / str(step)
    if not is_complete(step_dir):
        raise FileNotFoundError(f"{step_dir}: not a complete checkpoint")
    stored = config_from_dict(read_meta(step_dir)["model_config"], str(step_dir / "data"))
    config = weights.config_with(stored, **config_overrides)
    graphdef, abstract = nnx.split(weights.abstract_model(config, cls))
    item = {"params": weights.restore_targets(abstract, shardings, np.dtype(stored.param_dtype))}
    restored = ocp.PyTreeCheckpointer().restore(  # the train state's params only, as stored
        step_dir / "state", args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))["params"]
    return weights.fill(graphdef, abstract, restored)
