"""Test harness for jobs of several local processes (docs/design.md "Many machines").

`run_job(n, argv, devices_per_process, timeout_s)` starts `n` copies of this module's `main`
(`python tests/multiprocess.py ...`) that join one `jax.distributed` job over 127.0.0.1 on a free
port, each with `devices_per_process` fake CPU devices, and returns their exit codes and output.
Every process is killed when the job ends, times out or the test fails.

The worker (`main`) runs the real sweep command (`experiments.sweep.main`) with the TINY model
swapped in (as tests/test_sweep.py does in-process), records every epoch's per-step loss terms
of every run (`PopulationProgram.train_epoch`, wrapped) and writes them to `<out>/steps.<process>.json`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(n: int, argv: list[str], devices_per_process: int, port: int | None = None,
          extra_env: dict | None = None) -> list[subprocess.Popen]:
    """Start the `n` worker processes of one job (process i gets `--process-id i`)."""
    port = port or free_port()
    env = dict(os.environ)
    env.update(EASE_JAX_TEST_DEVICES=str(devices_per_process), EASE_JAX_NO_COMPILATION_CACHE="1",
               PYTHONPATH=f"{ROOT}:{HERE}")
    env.update(extra_env or {})
    procs = []
    for i in range(n):
        dist = (["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                 str(n), "--process-id", str(i)] if n > 1 else [])
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multiprocess.py"), *argv,
                                       *dist], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def wait(procs: list[subprocess.Popen], timeout_s: float) -> list[tuple[int | None, str]]:
    """(exit code or None if it had to be killed, output) of every process; kills them all
    at the deadline."""
    deadline = time.monotonic() + timeout_s
    out = []
    try:
        for p in procs:
            try:
                text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                out.append((p.returncode, text))
            except subprocess.TimeoutExpired:
                kill(procs)
                text, _ = p.communicate()
                out.append((None, text))
    finally:
        kill(procs)
    return out


def run_job(n: int, argv: list[str], devices_per_process: int, timeout_s: float = 600.0,
            **kwargs) -> list[tuple[int | None, str]]:
    procs = start(n, argv, devices_per_process, **kwargs)
    return wait(procs, timeout_s)


# ------------------------------------------------------------------------------------------------
# The worker


def main(argv: list[str]) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", int(os.environ.get("EASE_JAX_TEST_DEVICES", "1")))
    from ease_jax import population
    from ease_jax.config import replace
    from experiments import cli, sweep

    from helpers import TINY_MODEL

    build_run = cli.build_run

    def tiny_build_run(*args, **kwargs):
        mcfg, loss, tcfg = build_run(*args, **kwargs)
        return replace(mcfg, **TINY_MODEL), loss, tcfg

    cli.build_run = tiny_build_run
    steps: list[dict] = []
    train_epoch = population.PopulationProgram.train_epoch

    def recording_train_epoch(self, state, train):
        from ease_jax.distributed import fetch

        state, metrics = train_epoch(self, state, train)
        steps.append({k: fetch(v).tolist() for k, v in metrics.items()})
        return state, metrics

    population.PopulationProgram.train_epoch = recording_train_epoch
    fail_after = os.environ.get("EASE_JAX_TEST_DIE_AFTER_EPOCH")
    if fail_after is not None:  # a process that dies mid-run (the fault test)
        def dying_train_epoch(self, state, train):
            out = recording_train_epoch(self, state, train)
            if len(steps) > int(fail_after) and jax.process_index() == int(
                    os.environ.get("EASE_JAX_TEST_DIE_PROCESS", "1")):
                os._exit(17)
            return out

        population.PopulationProgram.train_epoch = dying_train_epoch
    interrupt_after = os.environ.get("EASE_JAX_TEST_INTERRUPT_AFTER_EPOCH")
    if interrupt_after is not None:  # every process stops after that epoch (the resume test)
        inner = population.PopulationProgram.train_epoch

        def interrupted_train_epoch(self, state, train):
            if len(steps) >= int(interrupt_after):
                raise KeyboardInterrupt("interrupted by the test")
            return inner(self, state, train)

        population.PopulationProgram.train_epoch = interrupted_train_epoch
    try:
        results = sweep.main("mosi", argv=argv)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)
    out = Path(argv[argv.index("--out") + 1])
    record = {"process": jax.process_index(), "processes": jax.process_count(),
              "devices": jax.device_count(), "steps": steps,
              "models": list(results.get("models", {"single": results}))}
    (out / f"steps.{jax.process_index()}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
