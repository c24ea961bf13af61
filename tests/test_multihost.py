"""Two real processes through ``jax.distributed`` on this machine (coordinator on localhost, CPU
collectives: gloo, one device each) against one process with two devices: training gives the same
parameters, each process reads only its half of every batch, inference writes one submission
equal to the one-process one, and a SIGTERM to one process stops both at one step.

Every process is started with a deadline and killed with its partner when anything fails, so a
hung collective fails the test instead of hanging it."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import pytest
from test_train import SMALL, cli_args, dataset  # noqa: F401  (dataset: a pytest fixture)

from fwi_jax import train as T
from fwi_jax.checkpoint import load_params

pytestmark = pytest.mark.full  # several processes
ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN_SET = SMALL + ["train.epochs=1"]  # 16 training samples / batch 4: 4 steps, then validation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(
    argv: list[str] | Callable[[int], list[str]],
    n: int,
    logs: pathlib.Path,
    devices_per_process: int = 1,
    timeout: float = 300,
    expect: int = 0,
    while_running=None,
) -> None:
    """Start ``argv`` (or ``argv(i)`` for process i) as ``n`` processes of one ``jax.distributed``
    run (n = 1: a plain process)
    with ``devices_per_process`` CPU devices each, call ``while_running(processes)`` if given, and
    wait for all to exit with ``expect``, killing every one that is left at the first other exit
    status or at the deadline. Output goes to logs/<i>.{out,err}."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs, files = [], []
    try:
        for i in range(n):
            env = {
                **os.environ,
                "PYTHONPATH": str(ROOT),
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}",
            }
            if n > 1:
                env.update(
                    JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                    JAX_NUM_PROCESSES=str(n),
                    JAX_PROCESS_ID=str(i),
                )
            files += [(logs / f"{i}.out").open("w"), (logs / f"{i}.err").open("w")]
            procs.append(
                subprocess.Popen(
                    argv(i) if callable(argv) else argv,
                    cwd=ROOT,
                    env=env,
                    stdout=files[-2],
                    stderr=files[-1],
                )
            )
        deadline = time.time() + timeout
        if while_running is not None:
            while_running(procs)
        while any(p.poll() is None for p in procs) or any(p.returncode != expect for p in procs):
            failed = [i for i, p in enumerate(procs) if p.poll() not in (None, expect)]
            if failed:
                err = (logs / f"{failed[0]}.err").read_text()[-3000:]
                raise AssertionError(f"process {failed[0]} of {n} failed:\n{err}")
            assert time.time() < deadline, f"not finished after {timeout} s"
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()


def _train(dataset, tmp, n, devices_per_process):  # noqa: F811
    """Train TRAIN_SET in ``n`` processes: (workdir, each process's multihost_train.py report)."""
    argv = [
        sys.executable,
        "tests/multihost_train.py",
        str(dataset),
        str(tmp / "run"),
        str(tmp / "report_{process}.json"),
        *TRAIN_SET,
    ]
    run_processes(argv, n, tmp / "logs", devices_per_process)
    return tmp / "run", [json.loads((tmp / f"report_{i}.json").read_text()) for i in range(n)]


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory):  # noqa: F811
    """The reference: one process with two devices."""
    return _train(dataset, tmp_path_factory.mktemp("one_process"), n=1, devices_per_process=2)


@pytest.fixture(scope="module")
def two_processes(dataset, tmp_path_factory):  # noqa: F811
    return _train(dataset, tmp_path_factory.mktemp("two_processes"), n=2, devices_per_process=1)


def test_two_processes_train_like_one_with_two_devices(one_process, two_processes):
    """Same global batches, same steps: the parameters agree within the float32 reduction-order
    noise that test_train's four-devices test allows (its docstring says why), and each process
    read only its own half of every global batch."""
    ref_dir, (ref,) = one_process
    workdir, reports = two_processes
    assert [(r["process"], r["processes"], r["local_devices"], r["devices"]) for r in reports] == [
        (0, 2, 1, 2),
        (1, 2, 1, 2),
    ]
    assert (ref["processes"], ref["devices"]) == (1, 2)
    steps = sorted(ref["read"], key=int)
    assert len(steps) == 4 and all(sorted(r["read"], key=int) == steps for r in reports)
    for step in steps:
        mine, theirs = reports[0]["read"][step], reports[1]["read"][step]
        assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)  # half each
        assert sorted(mine + theirs) == sorted(ref["read"][step])  # together: the global batch
    for a, b in zip(
        jax.tree.leaves(load_params(workdir / "final")[1]),
        jax.tree.leaves(load_params(ref_dir / "final")[1]),
    ):
        outside = np.abs(a - b) > 2e-5 + 1e-4 * np.abs(b)
        assert outside.mean() <= 1e-4, f"{outside.sum()} of {a.size}: {np.abs(a - b).max():.2e}"
        np.testing.assert_allclose(a, b, atol=4 * 5e-4)  # 4 steps x lr
    ref_mape = ref["summary"]["best_mape"]
    assert reports[0]["summary"]["best_mape"] == pytest.approx(ref_mape, rel=1e-4)
    # one process writes the logs: one event file, each metrics line once
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records if "train/loss" in r]
    assert logged and len(logged) == len(set(logged))


def test_two_processes_infer_one_submission(dataset, one_process, tmp_path):  # noqa: F811
    """``python -m fwi_jax.infer`` itself in two processes: 7 samples (3 global batches of 4, the
    last padded; process 1 has one sample fewer) give one submission, written by process 0, equal
    to one process's."""
    ref_dir, _ = one_process
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"s{i:02d}\n" for i in range(7)))

    def infer(n, devices, name):
        out = tmp_path / name / "sub.npz"
        out.parent.mkdir()
        run_processes(
            [
                sys.executable,
                "-m",
                "fwi_jax.infer",
                "--data",
                str(dataset),
                "--list",
                str(ids),
                "--checkpoints",
                str(ref_dir),
                "--out",
                str(out),
                "--batch",
                "4",
                "--no-tta",
                "--no-progress",
            ],
            n,
            tmp_path / f"logs_{name}",
            devices,
        )
        assert sorted(p.name for p in out.parent.iterdir()) == ["sub.npz"]  # no leftovers
        with np.load(out) as z:
            return {k: z[k] for k in z.files}

    one, two = infer(1, 2, "one"), infer(2, 1, "two")
    assert sorted(two) == sorted(one) == [f"s{i:02d}" for i in range(7)]
    for k in one:
        # the same per-device programs on the same samples: equal up to float32 rounding
        np.testing.assert_allclose(two[k], one[k], rtol=1e-6, atol=1e-6)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_exact(
    dataset,  # noqa: F811  (the fixture imported from test_train)
    two_processes,
    tmp_path,
):
    """``python -m fwi_jax.train`` in two processes; a scheduler's SIGTERM reaches process 1 only.
    JAX's preemption service makes both stop after the same step, both save that checkpoint and
    exit with 143; --resume in two processes then ends where the uninterrupted run ended, bit for
    bit."""
    ref_dir, _ = two_processes
    workdir = tmp_path / "run"
    extra = ["train.epochs=1", "train.checkpoint_every_steps=1"]  # TRAIN_SET + checkpoints
    argv = [sys.executable, "-m", "fwi_jax.train", "--no-progress"]
    argv += cli_args(dataset, workdir, *extra)

    def preempt_process_1(procs):
        # the notice goes out once process 1 has joined the run (its preemption service owns
        # SIGTERM) and before its first step: the agreed step is then early, never the last one
        # (a notice that lands at the last step is no preemption: the run ends with 0). Waiting
        # for a saved checkpoint instead let a loaded machine reach the last step first.
        deadline = time.time() + 300
        log = tmp_path / "logs" / "1.err"
        while "model.attention=" not in (log.read_text() if log.exists() else ""):
            assert all(p.poll() is None for p in procs) and time.time() < deadline
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)

    run_processes(
        argv, 2, tmp_path / "logs", expect=T.PREEMPTED_EXIT, while_running=preempt_process_1
    )
    err = (tmp_path / "logs" / "0.err").read_text()
    stopped = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM after step ")]
    assert len(stopped) == 1 and stopped[0].endswith(" --resume"), err[-3000:]
    step = int(stopped[0].split()[5])
    assert 1 <= step < 4 and (workdir / "checkpoints" / str(step)).is_dir()
    run_processes(argv + ["--resume"], 2, tmp_path / "logs_resumed")
    out = (tmp_path / "logs_resumed" / "0.out").read_text()
    assert f"resuming {workdir} at step {step} of 4" in out
    for a, b in zip(
        jax.tree.leaves(load_params(workdir / "final")[1]),
        jax.tree.leaves(load_params(ref_dir / "final")[1]),
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("failing", [1, 0])
def test_an_error_on_one_process_stops_both_at_once(dataset, tmp_path, failing):  # noqa: F811
    """One process alone cannot read its --data (a folder missing on its node). It prints its one
    error line and exits with 2 at once; the other, which has started the run and would wait for
    it in a collective, stops with 2 too, naming that process and its error, within seconds
    rather than after JAX's timeouts (30 s for the CPU collectives' set-up, then a traceback; 300 s
    in the shutdown barrier for the failed one). Process 0, which hosts the coordination service,
    fails first or last alike: no process aborts with a fatal log when it ends."""
    missing = tmp_path / "not_on_this_node"

    def argv(i):
        data = missing if i == failing else dataset
        return [sys.executable, "-m", "fwi_jax.train", "--no-progress"] + cli_args(
            data, tmp_path / "run", "train.epochs=1"
        )

    start = time.time()
    run_processes(argv, 2, tmp_path / "logs", expect=2, timeout=120)
    took = time.time() - start
    err = [(tmp_path / "logs" / f"{i}.err").read_text() for i in range(2)]
    errors = [ln for ln in err[failing].splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and str(missing) in errors[0], err[failing][-3000:]
    other = err[1 - failing]
    said = [ln for ln in other.splitlines() if ln.startswith("error: ")]
    assert said == [f"error: process {failing} of 2 stopped: {errors[0][len('error: ') :]}"], other
    assert not any(s in err[0] + err[1] for s in ("Traceback", "Terminating process"))
    assert "CPU tuning NOT applied" not in (tmp_path / "logs" / "0.out").read_text()
    assert took < 60, f"{took:.0f} s"
