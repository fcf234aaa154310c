"""Jobs of several processes on this machine (docs/design.md "Many machines"): 2 processes x 2 fake
CPU devices over 127.0.0.1 against 1 process x 4 devices, a resumed job, a lost peer.

Each job is `tests/multiprocess.py` (the real sweep command with the TINY model) started by the
harness there: free port, bounded waits, every process killed at the end. The jobs are marked
`slow` (each compiles its programs); `.ci/run` runs them after the default suite.
"""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest

from ease_jax import checkpoint
from ease_jax import distributed as dist
from ease_jax.config import ModelConfig
from ease_jax.models import init_params

from multiprocess import run_job

TIMEOUT = 600


def sweep_argv(tiny_pickle, out, model: str, seeds: str, every: str = "0") -> list[str]:
    return ["--data", str(tiny_pickle), "--model", model, "--seeds", seeds, "--epochs", "2",
            "--batch-size", "8", "--text-encoder", "features", "--checkpoint-seconds", every,
            "--no-progress", "--out", str(out)]


def job(n: int, devices: int, argv: list[str], cache, timeout=TIMEOUT, **kwargs):
    """Run the job; fail the test with every process's output unless all exit 0."""
    results = run_job(n, argv, devices, timeout_s=timeout,
                      extra_env={"EASE_JAX_CACHE_DIR": str(cache),
                                 "EASE_JAX_NO_COMPILATION_CACHE": ""} | kwargs.pop("env", {}),
                      **kwargs)
    return results


def ok(results):
    bad = [(i, code) for i, (code, _) in enumerate(results) if code != 0]
    assert not bad, "\n\n".join(f"--- process {i} (exit {code}) ---\n{text[-4000:]}"
                                for i, (code, text) in enumerate(results))
    return results


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


def _numbers(tree, path=""):
    """Every number of a results.json subtree as {path: value}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_numbers(v, f"{path}/{k}"))
        return out
    if isinstance(tree, list):
        out = {}
        for i, v in enumerate(tree):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: tree} if isinstance(tree, (int, float)) and not isinstance(tree, bool) else {}


def _params(run_dir, seed):
    results = json.loads((run_dir / "results.json").read_text())
    cfg = ModelConfig(**{k: v for k, v in results["config"]["model"].items()})
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    target = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    params, _ = checkpoint.restore(run_dir / f"seed_{seed}" / "best", target)
    return params


def _rel_l2(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = math.sqrt(sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y)) ** 2))
                        for x, y in zip(la, lb)))
    den = math.sqrt(sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb))
    return num / den


def assert_same_job(one_dir, two_dir, seeds):
    """The 2-process job's numbers equal the 1-process job's: per-step loss terms (1e-5
    relative), honest parameters (1e-3 relative L2), selected epochs, results.json (1e-4)."""
    ref = json.loads((one_dir / "steps.0.json").read_text())
    got = [json.loads((two_dir / f"steps.{i}.json").read_text()) for i in range(2)]
    assert ref["processes"] == 1 and ref["devices"] == 4
    assert [g["processes"] for g in got] == [2, 2] and got[0]["devices"] == 4
    assert got[0]["steps"] == got[1]["steps"]  # every process saw the same numbers
    assert len(got[0]["steps"]) == len(ref["steps"]) == 2
    for e, (a, b) in enumerate(zip(got[0]["steps"], ref["steps"])):
        for term in b:
            if term == "nonfinite":
                continue
            np.testing.assert_allclose(a[term], b[term], rtol=1e-5, atol=1e-6,
                                       err_msg=f"epoch {e} {term}")
    res_two = json.loads((two_dir / "results.json").read_text())
    res_one = json.loads((one_dir / "results.json").read_text())
    for s in seeds:
        assert (res_two["seeds"][str(s)]["selected_epochs"]
                == res_one["seeds"][str(s)]["selected_epochs"])
        assert _rel_l2(_params(two_dir, s), _params(one_dir, s)) < 1e-3
    a, b = _numbers(res_two["protocols"]), _numbers(res_one["protocols"])
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        if not (math.isnan(a[k]) and math.isnan(b[k])):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k


def assert_only_primary_reported(two_dir, results):
    assert (two_dir / "run.log").is_file() and (two_dir / "run.log.1").is_file()
    other_log = (two_dir / "run.log.1").read_text()
    assert "wrote" not in other_log and "wrote" in (two_dir / "run.log").read_text()
    title = (two_dir / "results.md").read_text().splitlines()[0]  # printed by the writer
    assert title in results[0][1] and title not in results[1][1]


@pytest.mark.slow
def test_population_across_processes_equals_one_process(tiny_pickle, tmp_path, cache):
    """Two EASE seeds as one population: "runs" spans the processes (2 x 2 mesh), no gradient
    traffic between them."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(job(1, 4, sweep_argv(tiny_pickle, one, "ease", "1111,1112") + ["--parallel",
                                                                         "shard_map"], cache))
    results = ok(job(2, 2, sweep_argv(tiny_pickle, two, "ease", "1111,1112"), cache))
    assert_same_job(one, two, (1111, 1112))
    assert_only_primary_reported(two, results)
    assert (two / "population-seed_1111+seed_1112" / "latest").is_dir()


@pytest.mark.slow
def test_single_run_data_parallel_across_processes_equals_one_process(tiny_pickle, tmp_path,
                                                                      cache):
    """One LNLN run: "data" spans both processes (1 x 4 mesh), gradients averaged across them."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(job(1, 4, sweep_argv(tiny_pickle, one, "lnln", "1111") + ["--parallel", "shard_map"],
           cache))
    ok(job(2, 2, sweep_argv(tiny_pickle, two, "lnln", "1111"), cache))
    assert_same_job(one, two, (1111,))


@pytest.mark.slow
def test_interrupted_job_resumes_bit_identical(tiny_pickle, tmp_path, cache):
    """Saved on a clock (--checkpoint-seconds 0.5): process 0's clock decides for all, so the
    processes save at the same epochs."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(job(2, 2, sweep_argv(tiny_pickle, full, "ease", "1111,1112", "0.5"), cache))
    interrupted = job(2, 2, sweep_argv(tiny_pickle, cut, "ease", "1111,1112", "0.5"), cache,
                      env={"EASE_JAX_TEST_INTERRUPT_AFTER_EPOCH": "1"})
    assert [code for code, _ in interrupted] == [3, 3], interrupted
    assert not (cut / "results.json").exists()
    ok(job(2, 2, sweep_argv(tiny_pickle, cut, "ease", "1111,1112", "0.5") + ["--resume"],
           cache))
    assert "resumed after epoch 1" in (cut / "run.log").read_text()
    for s in (1111, 1112):
        a, b = _params(cut, s), _params(full, s)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)
    a = json.loads((cut / "results.json").read_text())["protocols"]
    b = json.loads((full / "results.json").read_text())["protocols"]
    assert _numbers(a) == pytest.approx(_numbers(b), nan_ok=True, rel=0, abs=0)


@pytest.mark.slow
def test_a_lost_peer_stops_the_job_and_it_resumes(tiny_pickle, tmp_path, cache):
    out = tmp_path / "job"
    argv = sweep_argv(tiny_pickle, out, "ease", "1111,1112") + ["--distributed-timeout", "40"]
    died = job(2, 2, argv, cache, timeout=300,
               env={"EASE_JAX_TEST_DIE_AFTER_EPOCH": "1", "EASE_JAX_TEST_DIE_PROCESS": "1"})
    (code0, text0), (code1, _) = died
    assert code1 == 17  # the process the test killed
    assert code0 not in (0, None), text0[-3000:]  # the survivor stopped by itself, with an error
    # JAX's coordination service names the silent task: "Task 1 heartbeat timeout ... The
    # following tasks are unhealthy (stopped sending heartbeats): 1".
    assert re.search(r"Task 1 heartbeat timeout|unhealthy[^:]*:\s*1\b", text0), text0[-3000:]
    resumed = ok(job(2, 2, argv + ["--resume"], cache))
    assert "resumed after epoch 1" in resumed[0][1]  # from the checkpoint of epoch 1
    assert (out / "results.json").is_file()


def test_mesh_shape_keeps_data_inside_a_process_for_populations():
    assert dist.mesh_shape(2, 4, "shard_map", n_processes=2) == (2, 2)
    assert dist.mesh_shape(1, 4, "shard_map", n_processes=2) == (1, 4)
    assert dist.mesh_shape(4, 4, "shard_map", n_processes=2) == (4, 1)
    with pytest.raises(ValueError, match="shard_map"):
        dist.mesh_shape(2, 4, "pmap", n_processes=2)


def test_initialize_needs_all_three_or_none():
    with pytest.raises(dist.DistributedError, match="go together"):
        dist.initialize("127.0.0.1:1", None, 0)
