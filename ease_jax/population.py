"""Many runs in one program (docs/design.md "Many runs, one program" and "One epoch, one device
call").

A population is P runs of one model that differ only in numbers: the seed (and so the
initialisation, data order, training masks, subset views and imputation noise), every loss weight
of `LossConfig` and the base learning rate. Those numbers live in the `TrainState` (`rng`,
`mask_rng`, `order_rng`, `hparams`) and the population's state carries a leading run axis [P] on
every leaf, anchors and optimizer states included. The per-device train step is vmapped over that
axis (on a CPU, mapped over in turn: `default_run_batch`), so one compiled program trains all P
runs; what changes the graph (w/o UCMI, another model, other shapes) needs a population of its own.
On a CPU the runs are mapped in turn and keep the encode-once path; vmapped runs trace their step
with `ModelConfig.encode_once` off (a vmapped `lax.cond` runs both branches).

One epoch is one device call: the training split is placed on the devices once, and
`PopulationProgram.train_epoch` is a jitted `lax.scan` over the epoch's steps, each run drawing its
data order (`train.epoch_rows`) and masks from its own keys on the device; the last partial batch is
padded with zero-weight rows. `PopulationProgram.predict` evaluates every run (or any stack of
parameter sets) on device-resident rows in one more call.

Devices. The mesh is ("runs", "data") with R x D devices:
* shard_map: a 2-D mesh; the run axis of the state is sharded over "runs" (P / R runs per
  device) and replicated over "data"; each data device trains its slice of every global batch
  and gradients are averaged over "data" only. R defaults to gcd(P, devices).
* pmap: the device axis is "data" (R = 1): every device holds all P runs (vmapped) and its
  slice of each run's batch.
A run's numbers do not depend on (R, D) beyond float rounding: the step is global-batch
normalised and its randomness is keyed by sample index (`train.make_train_step`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ease_jax import distributed
from ease_jax.config import LOSS_WEIGHTS, LossConfig, ModelConfig, RunConfig, TrainConfig, replace
from ease_jax.train import (
    AXIS,
    TrainState,
    create_state,
    epoch_rows,
    eval_noise_key,
    forward,
    gather_rows,
    global_batch_size,
    make_train_step,
    steps_per_epoch,
)

RUNS = distributed.RUNS
# Rows per evaluation batch, summed over the runs evaluated together: 64 on a CPU, where a
# batch of 256 ran 1.45x slower per sample (EASE at MOSI shapes, 2-core AMD EPYC; 16-64 rows are
# alike: the working set of the long-sequence attention fits the caches), 256 on accelerators.
EVAL_ROWS = {"cpu": 64}
EVAL_ROWS_ACCELERATOR = 256


def default_eval_rows(devices) -> int:
    """Evaluation rows per batch on these devices (`EVAL_ROWS`)."""
    return EVAL_ROWS.get(devices[0].platform, EVAL_ROWS_ACCELERATOR)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: its seed, its loss weights (a `LossConfig`; None = the base one), base learning
    rate (None = the train config's), model (a `ModelConfig`; None = the base one; runs of
    different models train in different populations, `fit.fit_runs`) and a name (its directory;
    default `seed_<seed>`)."""

    seed: int
    loss: LossConfig | None = None
    lr: float | None = None
    name: str | None = None
    model: ModelConfig | None = None

    @property
    def label(self) -> str:
        return self.name or f"seed_{self.seed}"


def program_key(loss: LossConfig) -> tuple:
    """The fields of a LossConfig that shape the program: all but the weights (numbers of a run,
    `train.run_hparams`)."""
    return tuple((f.name, getattr(loss, f.name)) for f in dataclasses.fields(LossConfig)
                 if f.name not in LOSS_WEIGHTS)


def check_population(runs: Sequence[Run], base_loss: LossConfig,
                     base_model: ModelConfig | None = None) -> None:
    """Raise a ValueError when the runs cannot share one program: their LossConfigs may differ
    from the population's only in the weights, their model (when set) must
    be the population's, and names must be unique."""
    if not runs:
        raise ValueError("a population needs at least one run")
    names = [r.label for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    base = dict(program_key(base_loss))
    for r in runs:
        if r.model is not None and base_model is not None and r.model != base_model:
            raise ValueError(f"run {r.label}: its ModelConfig differs from the population's; "
                             "train it in a population of its own (`fit.fit_runs` groups them)")
        if r.loss is None:
            continue
        for name, value in program_key(r.loss):
            if value != base[name]:
                raise ValueError(
                    f"run {r.label}: LossConfig.{name} = {value!r} differs from the "
                    f"population's {base[name]!r}; it changes the program, so train that run "
                    "in a population of its own")


def stack(trees: Sequence[Any]) -> Any:
    """Host pytrees with equal structure -> one pytree with a leading axis [len(trees)]."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, i: int) -> Any:
    """Member i of a stacked host pytree."""
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def init_population(model_cfg: ModelConfig, train_cfg: TrainConfig, base_loss: LossConfig,
                    runs: Sequence[Run], spe: int, params: Sequence[Any] | None = None,
                    train_split: Any = None) -> TrainState:
    """The stacked host state of `runs` ([P] on every leaf): each run's `create_state` (its
    parameters from `params[i]` when given, else initialised from its seed; `train_split` for
    released training masks)."""
    check_population(runs, base_loss, model_cfg)
    params = list(params) if params is not None else [None] * len(runs)
    states = [jax.device_get(create_state(model_cfg, train_cfg, r.seed, spe, params=p,
                                          loss_cfg=r.loss or base_loss, lr=r.lr,
                                          train_split=train_split))
              for r, p in zip(runs, params)]
    return stack(states)


mesh_shape = distributed.mesh_shape


class PopulationProgram:
    """The compiled programs of one population of `n_runs` runs on `devices`. A device's runs are
    vmapped `run_batch` at a time (default `default_run_batch`: all on an accelerator, one at a
    time, a `lax.map`, on a CPU).

    `train_epoch(state, train) -> (state, metrics)`: one epoch of every run (`metrics`: each
    loss term, `lr` and `nonfinite` per run and step, [P, steps]). `predict(params, rows, keep)
    -> [S, N]`: predictions of S stacked parameter sets on evaluation rows (`put_rows`). Place
    the host state with `put_state` and read it back with `get_state`; `put_train` places the
    training arrays once. `traces` counts how often each program was traced (compiles).
    """

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig,
                 n_train: int, n_runs: int, *, parallel: str = "pmap", devices=None,
                 run_devices: int | None = None, eval_rows: int | None = None,
                 run_batch: int | None = None):
        if parallel not in ("pmap", "shard_map"):
            raise ValueError(f"parallel mode must be 'pmap' or 'shard_map', got {parallel!r}")
        if run_batch is not None and run_batch < 1:
            raise ValueError(f"run_batch must be >= 1, got {run_batch}")
        self.model_cfg, self.train_cfg, self.parallel = model_cfg, train_cfg, parallel
        self.n_train, self.n_runs = n_train, n_runs
        self.devices = list(devices or distributed.global_devices())
        self.eval_rows = eval_rows or default_eval_rows(self.devices)
        n_processes = len({d.process_index for d in self.devices})
        self.r, self.d = mesh_shape(n_runs, len(self.devices), parallel, run_devices,
                                    n_processes)
        local = n_runs // self.r
        self.run_batch = min(run_batch or default_run_batch(self.devices, local), local)
        self.steps = steps_per_epoch(n_train, train_cfg.batch_size)
        self.global_batch = global_batch_size(train_cfg.batch_size, self.d)
        self.mesh = distributed.build_mesh(self.devices, self.r, self.d)
        self.traces = {"epoch": 0, "predict": 0}
        # Vmapped runs encode both passes in full: under vmap the encode-once `lax.cond` would
        # become a select that runs both branches (the same numbers either way).
        step_cfg = model_cfg if self.run_batch == 1 else replace(model_cfg, encode_once=False)
        self._step = make_train_step(step_cfg, loss_cfg, train_cfg, self.steps, n_train)
        if parallel == "pmap":
            self._epoch = jax.pmap(self._device_epoch, axis_name=AXIS, devices=self.devices,
                                   donate_argnums=(0,))
            self._predict = jax.pmap(self._device_predict, axis_name=AXIS, devices=self.devices)
        else:
            epoch = jax.shard_map(self._device_epoch, mesh=self.mesh, in_specs=(P(RUNS), P()),
                                  out_specs=(P(RUNS), P(RUNS)), check_vma=False)
            self._epoch = jax.jit(epoch, donate_argnums=(0,))
            predict = jax.shard_map(self._device_predict, mesh=self.mesh,
                                    in_specs=(P(RUNS), P(AXIS), P(AXIS)),
                                    out_specs=P(RUNS, AXIS), check_vma=False)
            self._predict = jax.jit(predict)

    # -- the per-device programs ----------------------------------------------------------------

    def _device_epoch(self, state: TrainState, train: dict):
        """One epoch of this device's runs ([p] leading axis) on its slice of every batch."""
        self.traces["epoch"] += 1
        b_local = self.global_batch // self.d
        bs = self.train_cfg.batch_size

        def run_epoch(st: TrainState, data: dict):
            rows = epoch_rows(st.order_rng, st.step // self.steps, self.n_train, bs,
                              self.global_batch)
            rows = jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(AXIS) * b_local,
                                                b_local, axis=1)

            def body(s, r):
                key = jax.random.fold_in(jax.random.wrap_key_data(s.rng), s.step)
                return self._step(s, gather_rows(data, r), jax.random.key_data(key))

            return jax.lax.scan(body, st, rows)

        return _map_runs(lambda st: run_epoch(st, train), state, self.run_batch)

    def _device_predict(self, params, rows: dict, keep: dict):
        """Predictions [p, 1, nb * bs] of this device's parameter sets [p, ...] on its rows
        ([nb, bs, ...] under pmap, [1, nb, bs, ...] under shard_map)."""
        self.traces["predict"] += 1
        if self.parallel == "shard_map":
            rows, keep = _squeeze0(rows), _squeeze0(keep)

        def one_params(p):
            def one_batch(args):
                x, k, i = args
                return forward(self.model_cfg, p, x, k, eval_noise_key(i))["pred"]

            nb = jax.tree_util.tree_leaves(rows)[0].shape[0]
            return jax.lax.map(one_batch, (rows, keep, jnp.arange(nb))).reshape(-1)

        return _map_runs(one_params, params, self.run_batch)[:, None]

    # -- placement ----------------------------------------------------------------------------

    def _replicate(self, tree):
        """Host tree -> every device holds all of it (pmap: stacked [devices, ...])."""
        if self.parallel == "pmap":
            sharding = NamedSharding(Mesh(np.array(self.devices), (AXIS,)), P(AXIS))
            n = len(self.devices)
            return jax.tree_util.tree_map(
                lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), sharding), tree)
        return distributed.put(tree, NamedSharding(self.mesh, P()))

    def put_state(self, state: TrainState):
        """Host stacked state (or any tree with a leading run axis) -> the devices."""
        host = jax.device_get(state)
        if self.parallel == "pmap":
            return self._replicate(host)
        return distributed.put(host, NamedSharding(self.mesh, P(RUNS)))

    def get_state(self, state):
        """Device state -> one host copy with the leading run axis (on every process)."""
        if self.parallel == "pmap":
            shards = jax.device_get(
                jax.tree_util.tree_map(lambda x: x.addressable_shards[0].data, state))
            return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), shards)
        return distributed.fetch(state)

    def put_train(self, arrays: dict) -> dict:
        """The training split's arrays (`train.model_arrays`) placed on every device once."""
        return self._replicate({k: np.asarray(v) for k, v in arrays.items()})

    def rows_layout(self, n: int, n_sets: int) -> tuple[int, int]:
        """(batches per device, rows per batch) for `n` evaluation rows and `n_sets` parameter
        sets: about `eval_rows` rows per batch summed over the sets a device evaluates."""
        per_device = -(-n // self.d)
        together = min(self.run_batch, max(n_sets // self.r, 1))
        bs = max(1, min(self.eval_rows // together, per_device))
        return -(-per_device // bs), bs

    def put_rows(self, arrays: dict, n_sets: int) -> dict:
        """Evaluation arrays [N, ...] -> device rows [D, nb, bs, ...] sharded over "data" (zero
        padding rows at the end). Masks of the same rows go through the same call."""
        n = next(iter(arrays.values())).shape[0]
        nb, bs = self.rows_layout(n, n_sets)
        total = self.d * nb * bs
        mesh = Mesh(np.array(self.devices), (AXIS,)) if self.parallel == "pmap" else self.mesh
        sharding = NamedSharding(mesh, P(AXIS))
        out = {}
        for k, v in arrays.items():
            v = np.asarray(v)
            v = np.concatenate([v, np.zeros((total - n, *v.shape[1:]), v.dtype)]) if total > n else v
            out[k] = distributed.put(v.reshape(self.d, nb, bs, *v.shape[1:]), sharding)
        return out

    def put_params(self, params_list: Sequence[Any]):
        """Host parameter trees -> stacked device parameters [S', ...], padded with copies of the
        last so that S' divides over the "runs" devices."""
        s = len(params_list)
        padded = list(params_list) + [params_list[-1]] * (-s % self.r)
        return self.put_state(stack(padded))

    # -- the calls ----------------------------------------------------------------------------

    def lower_epoch(self, state, train: dict) -> jax.stages.Lowered:
        """The epoch program traced and lowered for these arguments (device arrays or
        `jax.ShapeDtypeStruct`s of `put_state` / `put_train`'s layout); nothing runs. Its
        `.compile()` gives XLA's memory and cost analyses."""
        return self._epoch.lower(state, train)

    def lower_predict(self, params, rows: dict, keep: dict) -> jax.stages.Lowered:
        """The predict program traced and lowered for these device arguments; nothing runs."""
        return self._predict.lower(params, rows, keep)

    def train_epoch(self, state, train: dict):
        """One epoch of every run: (state, metrics {name: [P, steps]} still on device)."""
        state, metrics = self._epoch(state, train)
        if self.parallel == "pmap":
            metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
        return state, metrics

    def predict(self, params, rows: dict, keep: dict, n: int) -> jax.Array:
        """Predictions [S', n] (still on device) of the stacked device `params` on `n` rows."""
        preds = self._predict(params, rows, keep)
        if self.parallel == "pmap":  # [D, S', 1, nb * bs] -> [S', D, nb * bs]
            preds = jnp.swapaxes(preds[:, :, 0], 0, 1)
        return preds.reshape(preds.shape[0], -1)[:, :n]


@functools.lru_cache(maxsize=8)
def _cached_program(*args, **kwargs) -> PopulationProgram:
    return PopulationProgram(*args, **kwargs)


def get_program(model_cfg: ModelConfig, loss_cfg: LossConfig, train_cfg: TrainConfig,
                n_train: int, n_runs: int, *, parallel: str = "pmap", devices=None,
                run_devices: int | None = None, eval_rows: int | None = None,
                run_batch: int | None = None) -> PopulationProgram:
    """A `PopulationProgram`, shared by every caller with the same arguments (the 8 most recent
    are kept), so populations of the same shapes, e.g. the groups of `--population N` or a
    resumed run, compile once per process."""
    devices = tuple(devices or jax.local_devices())
    return _cached_program(model_cfg, loss_cfg, train_cfg, n_train, n_runs, parallel=parallel,
                           devices=devices, run_devices=run_devices, eval_rows=eval_rows,
                           run_batch=run_batch)


def default_run_batch(devices, runs_per_device: int) -> int:
    """How many of a device's runs are vmapped together: all of them on an accelerator (the
    point of a population: a small model leaves a GPU idle), one at a time on a CPU, where a
    batched run costs more than running the runs in turn (benchmark: 3 vmapped EASE runs took
    1.47x the time of 3 single runs, and encode-once is lost under vmap)."""
    return 1 if devices[0].platform == "cpu" else runs_per_device


def _map_runs(fn, tree, run_batch: int):
    """`fn` over the leading run axis of `tree`: a `lax.map` (runs in turn) for run_batch 1, a
    vmap of all for run_batch >= the number of runs, else a `lax.map` over vmapped chunks."""
    n = jax.tree_util.tree_leaves(tree)[0].shape[0]
    if run_batch == 1:
        return jax.lax.map(fn, tree)
    if run_batch >= n:
        return jax.vmap(fn)(tree)
    return jax.lax.map(fn, tree, batch_size=run_batch)


def _squeeze0(tree):
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def run_footprint_bytes(run_cfg: RunConfig, train_arrays: dict) -> dict:
    """Memory of the epoch program of one run on one device, from XLA's memory analysis of the
    compiled program (encode-once off, as when runs are vmapped): {"state": a run's state
    (parameters, optimizer state, anchors), "temp": the step's temporaries, "data": the training
    arrays (`data.model_arrays`), shared by all runs}. Vmapped runs each need state + temp; runs
    mapped in turn share one temp. Compiles once; nothing runs."""
    mcfg, tcfg = replace(run_cfg.model, encode_once=False), run_cfg.train
    n_train = next(iter(train_arrays.values())).shape[0]
    prog = PopulationProgram(mcfg, run_cfg.loss, tcfg, n_train, 1, parallel="shard_map",
                             devices=jax.local_devices()[:1], run_batch=1)
    state = jax.eval_shape(lambda: stack_shapes(
        [create_state(mcfg, tcfg, 0, prog.steps, loss_cfg=run_cfg.loss,
                      train_split=train_arrays)]))
    train = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
             for k, v in train_arrays.items()}
    mem = prog.lower_epoch(state, train).compile().memory_analysis()
    return {"state": int(_nbytes(state)), "temp": int(mem.temp_size_in_bytes),
            "data": int(_nbytes(train))}


def stack_shapes(trees: Sequence[Any]) -> Any:
    """`stack` for traced or abstract pytrees (`jax.numpy`): [len(trees), ...] on every leaf."""
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def device_memory_bytes() -> float:
    """Memory one program may use: the accelerator's `bytes_limit`, else 80% of the host RAM."""
    import os

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return 0.9 * float(stats["bytes_limit"])
    return 0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def plan_population(requested, run_cfg: RunConfig, train_arrays: dict, n_runs: int,
                    log=print) -> int:
    """How many of `n_runs` runs share one program: all (`requested` None), N, or "auto": as many
    as fit in the device memory (`device_memory_bytes`) by the compiled epoch program's footprint
    (`run_footprint_bytes`): state + temporaries per vmapped run, or one shared set of
    temporaries when the runs are mapped in turn (CPU)."""
    if requested is None:
        return n_runs
    if requested != "auto":
        return max(1, min(int(requested), n_runs))
    mem = run_footprint_bytes(run_cfg, train_arrays)
    vmapped = default_run_batch(jax.local_devices(), n_runs) > 1
    per_run = mem["state"] + (mem["temp"] if vmapped else 0)
    free = device_memory_bytes() - mem["data"] - (0 if vmapped else mem["temp"])
    size = max(1, min(n_runs, int(free // max(per_run, 1))))
    log(f"--population auto: {per_run / 2**30:.2f} GiB per run "
        f"({'vmapped' if vmapped else 'mapped in turn'}; data {mem['data'] / 2**30:.2f} GiB, "
        f"step temporaries {mem['temp'] / 2**30:.2f} GiB), {free / 2**30:.1f} GiB available -> "
        f"{size} run(s) per program")
    return size
