"""Checkpoints (the only module that imports Orbax).

With several processes every process calls `save` / `restore` on the same shared directory;
Orbax writes once and commits from process 0, and which checkpoint steps exist is taken from
process 0's listing (`distributed.agree_steps`), so all processes run the same collectives.

A run directory holds `latest/` (the full TrainState plus a JSON record of the host-side run state:
epoch, selection bests, results so far; written every epoch, one kept) and `best/` (the honest
protocol's selected parameters). `restore` lets an interrupted run continue exactly where
it stopped: parameters, optimizer state, anchors, step and the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ease_jax import distributed


def _manager(directory: Path) -> ocp.CheckpointManager:
    # Keeping one checkpoint per directory is done by `save` itself: Orbax's max_to_keep keeps
    # the highest steps, which would drop a re-run's lower step instead of the old one.
    options = ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def _host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def save(directory: str | Path, step: int, state: Any, record: dict | None = None) -> None:
    """Save `state` (any pytree of arrays) and a JSON-able `record` under `directory` at `step`,
    replacing what the directory held (also a checkpoint of the same step, as when a resumed
    or repeated run redoes an epoch). The new checkpoint is complete before the old ones go,
    except when it replaces the same step."""
    distributed.barrier("checkpoint: before listing")
    with _manager(Path(directory)) as mngr:
        existing = distributed.agree_steps(mngr.all_steps())
        if step in existing:
            mngr.delete(step)
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_host(state)),
                                                record=ocp.args.JsonSave(record or {})),
                  force=True)
        mngr.wait_until_finished()
        for old in existing:
            if old != step:
                mngr.delete(old)


def latest_step(directory: str | Path) -> int | None:
    """The step of the checkpoint in `directory`, or None if there is none."""
    if not Path(directory).is_dir():
        return None
    with _manager(Path(directory)) as mngr:
        return mngr.latest_step()


def restore(directory: str | Path, target: Any) -> tuple[Any, dict]:
    """Restore (state, record) from `directory`; `target` is a pytree with the state's structure
    (e.g. a freshly created state), whose leaves give shapes and dtypes."""
    with _manager(Path(directory)) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), _host(target))
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    state = jax.tree_util.tree_map(lambda t, x: np.asarray(x), _host(target), out["state"])
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target),
                                         jax.tree_util.tree_leaves(state))
    return state, dict(out["record"] or {})
