"""python -m fwi_jax.train: traced once, exact resume after kill -9, 1 vs 4 devices, float16
overflow skips, gradient accumulation, initial weights, and clear user errors.

A small network on the demo geometry (2 blocks of width 64) over 20 random competition-format
samples (16 train / 4 validation by the reference split) keeps each run to seconds."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax import train as T
from fwi_jax.checkpoint import load_params, save_params
from fwi_jax.config import load_config
from fwi_jax.data.io import SHOT_FILES, VELOCITY_FILE
from fwi_jax.model import create_model
from fwi_jax.optim import make_optimizer
from fwi_jax.preprocess import ZERO_CHANNEL, flip
from fwi_jax.runlog import GAP_PX

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = [
    "model.dim=64",
    "model.heads=2",
    "model.depth=2",
    "model.split=1",
    "train.batch_size=4",
    "train.log_every_steps=2",
    "train.ema_start_epoch=1",
    "train.ema_decay=0.9",
    "data.prefetch=1",
    "train.warmup_steps=0",  # the demo's 64 steps are more than these runs take
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_ds")
    rng = np.random.default_rng(0)
    for i in range(20):
        d = root / f"s{i:02d}"
        d.mkdir()
        for name in SHOT_FILES:
            np.save(d / name, (1e-4 * rng.standard_normal((10001, 31))).astype(np.float32))
        depth = np.linspace(0.0, 1.5, 1259, dtype=np.float32)[None, :]
        np.save(
            d / VELOCITY_FILE, (1.8 + rng.uniform(0, 1) + depth + np.zeros((300, 1), np.float32))
        )
    return root


def small_cfg(dataset, *extra):
    return load_config("demo", SMALL + [f"data.root={dataset}", *extra])


def run_cli(args, devices=1, timeout=400):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen(
        [sys.executable, "-m", "fwi_jax.train", "--no-progress", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def cli_args(dataset, workdir, *extra):
    return [
        "--config",
        "demo",
        "--data",
        str(dataset),
        "--workdir",
        str(workdir),
        *[a for s in SMALL + list(extra) for a in ("--set", s)],
    ]


def finish(proc, timeout=400):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def tensorboard_events(workdir):
    """TensorBoard's own reader over a work directory: {scalar tag: [(step, value)]}, and the
    validation images' (step, width, height)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = [(e.step, e.width, e.height) for e in acc.Images("val/sample0")]
    return scalars, images


def params_of(workdir, name="final"):
    return load_params(pathlib.Path(workdir) / name)[1]


RESUME_SET = ["train.epochs=4", "train.checkpoint_every_steps=2"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    """The reference run for the resume and device-count tests: 4 epochs x 4 steps, one device."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    summary = finish(run_cli(cli_args(dataset, workdir, *RESUME_SET)))
    return workdir, summary


def test_train_in_process_traces_once_and_writes_run(dataset, tmp_path):
    T.TRACES.clear()
    cfg = small_cfg(dataset, "train.epochs=2")
    summary = T.train(cfg, tmp_path / "run", progress=False)
    assert summary["traces"] == {"train_step": 1, "eval_step": 1}  # 8 steps and 2 validations
    assert summary["steps"] == 8 and np.isfinite(summary["best_mape"])
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    vals = [r for r in records if "val/mape" in r]
    assert [r["step"] for r in vals] == [4, 8] and [r["val/ema"] for r in vals] == [False, True]
    assert all(np.isfinite(r["train/loss"]) and r["lr"] > 0 for r in records if "train/loss" in r)
    # the same records in TensorBoard's event files, and truth | prediction | error per validation
    scalars, images = tensorboard_events(tmp_path / "run")
    for key in ("train/loss", "train/grad_norm", "lr", "loss_scale", "samples_per_s", "val/mape"):
        logged = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in scalars[key]] == [s for s, _ in logged], key
        np.testing.assert_allclose([v for _, v in scalars[key]], [v for _, v in logged], rtol=1e-6)
    depth, width = cfg.geometry.out_shape
    assert images == [(4, 3 * width + 2 * GAP_PX, depth), (8, 3 * width + 2 * GAP_PX, depth)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["dim"] == 64
    best_cfg, best = load_params(tmp_path / "run" / "best")
    assert best_cfg == cfg and jax.tree.structure(best) == jax.tree.structure(create_model(cfg)[1])
    # the best params are the EMA of the best epoch: inference reproduces its validation MAPE
    from fwi_jax.infer import main as infer_main

    ids = tmp_path / "val.txt"
    from fwi_jax.data.split import reference_split

    ids.write_text("\n".join(reference_split(sorted(p.name for p in dataset.iterdir()))[1]) + "\n")
    assert (
        infer_main(
            [
                "--data",
                str(dataset),
                "--list",
                str(ids),
                "--checkpoints",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "sub.npz"),
                "--no-tta",
                "--val",
                "--batch",
                "4",
            ]
        )
        == 0
    )


@pytest.mark.full
def test_kill_9_then_resume_is_bit_exact(dataset, uninterrupted, tmp_path):
    ref_dir, ref_summary = uninterrupted
    workdir = tmp_path / "killed"
    proc = run_cli(cli_args(dataset, workdir, *RESUME_SET))
    ckpt_dir = workdir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline:  # wait for a finished checkpoint past the first epoch, then kill
        steps = (
            [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()]
            if ckpt_dir.exists()
            else []
        )
        if any(s >= 6 for s in steps):
            break
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
    assert killed_at < 16
    # a checkpoint a crash left half-written (orbax writes under a temporary name, then renames)
    import shutil

    half = ckpt_dir / "15.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpt_dir / str(killed_at), half)
    for f in list(half.rglob("*"))[::2]:
        if f.is_file():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    from fwi_jax.checkpoint import TrainCheckpoints

    assert TrainCheckpoints(ckpt_dir).latest_step() == killed_at  # never offered for loading
    resumed = run_cli(cli_args(dataset, workdir, *RESUME_SET) + ["--resume"])
    summary_out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads(summary_out.strip().splitlines()[-1])
    ours, ref = params_of(workdir), params_of(ref_dir)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert summary["best_mape"] == ref_summary["best_mape"]
    assert f"resuming {workdir} at step {killed_at} of 16" in summary_out
    steps = [
        json.loads(line)["step"]
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # no step logged twice after the resume
    # TensorBoard's reader sees every step once: what the killed process logged past its last
    # checkpoint is purged, and nothing it logged before is lost (events are flushed per record)
    scalars, images = tensorboard_events(workdir)
    assert [s for s, _ in scalars["train/loss"]] == steps
    assert [s for s, _ in scalars["val/mape"]] == [4, 8, 12, 16] == [s for s, *_ in images]


def _wait_for_checkpoint(proc, ckpt_dir, at_least, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = (
            [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()]
            if ckpt_dir.exists()
            else []
        )
        if any(s >= at_least for s in steps):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint >= {at_least} in {ckpt_dir} after {timeout} s")


def _assert_same_params(workdir, ref_dir):
    for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(params_of(ref_dir))):
        np.testing.assert_array_equal(a, b)  # bit for bit


@pytest.mark.full
def test_sigterm_finishes_the_step_saves_and_resume_is_bit_exact(dataset, uninterrupted, tmp_path):
    """A scheduler's preemption: SIGTERM mid-run -> the step finishes, a checkpoint of it is saved,
    the run says how to continue and exits with 143; --resume then repeats the uninterrupted run."""
    ref_dir, ref_summary = uninterrupted
    workdir = tmp_path / "preempted"
    args = cli_args(dataset, workdir, *RESUME_SET)
    proc = run_cli(args)
    _wait_for_checkpoint(proc, workdir / "checkpoints", 4)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == T.PREEMPTED_EXIT == 143, err[-3000:]
    stopped = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGTERM after step ")]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split()[5])
    assert (
        4 <= step < 16 and f"checkpoint {workdir / 'checkpoints' / str(step)} saved" in stopped[0]
    )
    assert stopped[0].endswith(" --resume") and "to continue: python -m fwi_jax.train" in stopped[0]
    assert (workdir / "checkpoints" / str(step)).is_dir() and not (workdir / "final").exists()
    resumed = run_cli(args + ["--resume"])
    out, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming {workdir} at step {step} of 16" in out
    _assert_same_params(workdir, ref_dir)
    assert json.loads(out.strip().splitlines()[-1])["best_mape"] == ref_summary["best_mape"]


def _truncate_largest_array_file(step_dir):
    f = max(
        (f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )
    f.write_bytes(f.read_bytes()[:1000])


def quiet(err: str) -> bool:
    """No traceback and no report of the reads that orbax's failed restore left in flight (an
    abandoned coroutine, an asyncio future never retrieved, a callback onto a closed loop): after
    the one-line warning a damaged checkpoint prints nothing more."""
    return not any(
        s in err
        for s in (
            "Traceback",
            "Exception ignored",
            "never retrieved",
            "never awaited",
            "tensorstore",
        )
    )


@pytest.mark.full
def test_damaged_newest_checkpoint_resumes_from_the_one_before(dataset, uninterrupted, tmp_path):
    """The finished reference run with its newest checkpoint (16) truncated: --resume names it and
    what is wrong, continues from 14 and ends where the reference ended, bit for bit. With every
    checkpoint damaged it refuses in one error line (never a silent restart from step 0)."""
    import shutil

    ref_dir, ref_summary = uninterrupted
    workdir = tmp_path / "damaged"
    shutil.copytree(ref_dir, workdir)
    shutil.copytree(ref_dir, tmp_path / "all_damaged")
    ckpt_dir = workdir / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [14, 16]
    _truncate_largest_array_file(ckpt_dir / "16")
    proc = run_cli(cli_args(dataset, workdir, *RESUME_SET) + ["--resume"])
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert f"warning: checkpoint {ckpt_dir / '16'} is damaged (OUT_OF_RANGE: Error reading" in err
    assert "is not valid for value of size 1000); trying the one before" in err
    assert f"resuming {workdir} at step 14 of 16" in out and quiet(err)
    # set aside, then saved afresh
    assert (ckpt_dir / "16.damaged").is_dir() and (ckpt_dir / "16").is_dir()
    _assert_same_params(workdir, ref_dir)
    assert json.loads(out.strip().splitlines()[-1])["best_mape"] == ref_summary["best_mape"]

    workdir = tmp_path / "all_damaged"
    _truncate_largest_array_file(workdir / "checkpoints" / "16")
    (workdir / "checkpoints" / "14" / "meta" / "metadata").unlink()
    proc = run_cli(cli_args(dataset, workdir, *RESUME_SET) + ["--resume"])
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 2 and quiet(err)
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: no intact checkpoint in {workdir / 'checkpoints'} ("
    )
    assert (
        "14/meta/metadata not found" in errors[0]
        and "start a new run in another --workdir" in errors[0]
    )
    assert "resuming" not in out


def test_refused_checkpoint_write_stops_the_run_naming_it(dataset, tmp_path):
    """The disk refuses the step-4 checkpoint (real EFBIG writes: the process's file-size limit is
    lowered once checkpoint 2 is on disk): the run stops at the next save with an error naming
    checkpoint 4 and the intact checkpoint 2, which still restores."""
    import resource

    from fwi_jax.checkpoint import CheckpointSaveError, TrainCheckpoints

    cfg = small_cfg(dataset, "train.epochs=2", "train.checkpoint_every_steps=2")
    full = T.resolve_data(cfg)
    data = T.RunData(full.root, full.train_ids, [])  # no validation: no best/ written on the way
    workdir = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_the_disk(step, batch):
        if step == 3:  # checkpoint 2 was started after step 2: wait until it is complete
            while not (workdir / "checkpoints" / "2").is_dir():
                time.sleep(0.01)
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))  # < the head's 600 kB

    try:
        with pytest.raises(CheckpointSaveError) as e:
            T.train(cfg, workdir, data, progress=False, on_batch=fill_the_disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    msg = str(e.value)
    assert f"saving checkpoint {workdir / 'checkpoints' / '4'} failed: " in msg
    assert "File too large" in msg and "\n" not in msg
    assert f"the newest complete checkpoint, {workdir / 'checkpoints' / '2'}, is untouched" in msg
    ckpts = TrainCheckpoints(workdir / "checkpoints")
    assert ckpts.all_steps() == [2]
    state = jax.eval_shape(
        lambda: T.create_train_state(cfg, create_model(cfg)[1], make_optimizer(cfg, 8)[0])
    )
    step, restored, _, meta = ckpts.restore_newest_intact(state)
    assert step == 2 and int(restored["step"]) == 2 and meta["step"] == 2


@pytest.mark.full
def test_a_full_disk_stops_the_cli_with_one_error_line(dataset, tmp_path):
    """The command line with every write past 150 kB refused (EFBIG from the file-size limit, as
    ENOSPC from a full disk): the first checkpoint or best-model save fails and the run stops
    with one line on stderr naming it, without the pages of orbax and TensorStore reports of the
    writes it abandoned (background-thread tracebacks, futures never retrieved)."""
    import shlex

    workdir = tmp_path / "run"
    args = cli_args(dataset, workdir, "train.epochs=2", "train.checkpoint_every_steps=2")
    # no kernel build (its library is over the limit), and no "auto" line on stderr
    args += ["--set", "model.attention=xla", "model.dense=xla"]
    command = shlex.join([sys.executable, "-m", "fwi_jax.train", "--no-progress", *args])
    proc = subprocess.run(  # the shell sets the limit: no preexec_fn forked from JAX's threads
        ["bash", "-c", f"ulimit -f 146 && exec {command}"],  # 146 blocks of 1 KiB
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: saving ") and f"checkpoint {workdir}" in lines[0]
    assert "File too large" in lines[0]


def test_unwritable_workdir_fails_fast_naming_it(dataset, tmp_path, mount_tmpfs):
    """Before any data loading or compiling: a --workdir under a regular file (NotADirectory), and
    a read-only mount (tmpfs; skipped where this process may not mount)."""
    (tmp_path / "file").write_text("")
    cases = {tmp_path / "file" / "run": "Not a directory"}
    cases[mount_tmpfs(tmp_path / "ro", "ro,size=1m")] = "Read-only file system"
    for workdir, reason in cases.items():
        t0 = time.perf_counter()
        proc = run_cli(cli_args(dataset, workdir, *RESUME_SET))
        out, err = proc.communicate(timeout=60)
        elapsed = time.perf_counter() - t0
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert f"error: --workdir {workdir} is not writable: {reason}\n" in err
        assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.full
def test_four_devices_match_one(dataset, uninterrupted, tmp_path):
    """Same global batch over 4 forced host devices: params equal one device's within float32
    reduction-order noise after 16 AdamW steps of lr 5e-4.

    Differences stay ~1e-6 except where a gradient entry is itself at the noise level: Adam
    divides by sqrt(v), so such an entry moves by up to ~lr per step whatever its size, and the
    summation order decides its sign (the head's weights for pixels the crop nearly removes: 2 of
    its 150,528 weights drifted 3e-5 apart when the SwiGLU gate's VJP changed the rounding). So:
    at most 1 entry in 10,000 of each parameter outside atol 2e-5 / rtol 1e-4, and none further
    than 16 steps x lr. A real data-parallel bug (a shard's gradient missing, samples split or
    weighted wrongly) changes the gradient's direction, moves nearly every entry by ~lr per step
    and fails the first bound."""
    ref_dir, ref_summary = uninterrupted
    summary = finish(run_cli(cli_args(dataset, tmp_path / "d4", *RESUME_SET), devices=4))
    for a, b in zip(
        jax.tree.leaves(params_of(tmp_path / "d4")), jax.tree.leaves(params_of(ref_dir))
    ):
        a, b = np.asarray(a), np.asarray(b)
        outside = np.abs(a - b) > 2e-5 + 1e-4 * np.abs(b)
        assert outside.mean() <= 1e-4, (
            f"{outside.sum()} of {a.size} entries differ: max {np.abs(a - b).max():.2e}"
        )
        np.testing.assert_allclose(a, b, atol=16 * 5e-4)
    assert summary["best_mape"] == pytest.approx(ref_summary["best_mape"], rel=1e-4)


def _state_and_step(cfg, total=10):
    graphdef, params = create_model(cfg, 0)
    tx, schedule = make_optimizer(cfg, total)
    state = T.create_train_state(cfg, params, tx)
    step = jax.jit(T.make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0))
    return state, step


def _batch(seed, b=4, overflow=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, 6, 10000, 31)) * 0.5).astype(np.float32)
    if overflow:
        x[1, 2, 100, 5] = np.inf  # one bad value: NaN/Inf gradients in float16
    v = (2.0 + rng.uniform(0, 1, (b, 1, 1)) + np.zeros((b, 1259, 300))).astype(np.float32)
    return {"x": jnp.asarray(x), "v": jnp.asarray(v)}


def test_float16_overflow_skips_step_and_recovers(dataset):
    cfg = small_cfg(dataset, "model.dtype=float16")
    state, step = _state_and_step(cfg)
    assert float(state["loss_scale"].scale) == 2.0**16
    state, m = step(state, _batch(0))
    assert int(m["skipped_steps"]) == 0
    before = jax.device_get(state)
    state, m = step(state, _batch(1, overflow=True))
    assert int(m["skipped_steps"]) == 1 and not np.isfinite(float(m["grad_norm"]))
    assert float(state["loss_scale"].scale) == 2.0**15
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)  # the bad step changed nothing
    for a, b in zip(jax.tree.leaves(state["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
    for seed in (2, 3):
        state, m = step(state, _batch(seed))
    assert int(m["skipped_steps"]) == 1 and np.isfinite(float(m["loss"]))
    changed = any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(before["params"]))
    )
    assert changed
    for tree in (state["params"], state["ema"], state["opt_state"]):
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(tree))


def test_gradient_accumulation_equals_one_big_batch(dataset):
    results = []
    for accum in (1, 2):
        state, step = _state_and_step(small_cfg(dataset, f"train.grad_accum={accum}"))
        state, m = step(state, _batch(5))
        results.append((jax.device_get(state["params"]), float(m["loss"])))
    (p1, l1), (p2, l2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_constant_channel_once_steps_equal_off(dataset):
    """Two training steps with model.constant_channel_once on and off from the same params: the
    same loss and params within float32 rounding (the zero channel's row, once per step, carries
    its gradient like the per-sample rows it replaces). The batch mixes flipped samples."""
    batches = []
    for seed in (6, 7):
        b = _batch(seed)
        x = np.array(b["x"])
        x[:, ZERO_CHANNEL] = 0.0
        x[1::2] = flip(x[1::2])
        batches.append({"x": jnp.asarray(x), "v": b["v"]})
    results = []
    for on in (True, False):
        state, step = _state_and_step(small_cfg(dataset, f"model.constant_channel_once={on}"))
        losses = []
        for batch in batches:
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        results.append((jax.device_get(state["params"]), losses))
    (p_on, l_on), (p_off, l_off) = results
    assert l_on == pytest.approx(l_off, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_load_from_with_drop_head_and_init_from_params(dataset, tmp_path):
    cfg = small_cfg(dataset)
    _, trained = create_model(cfg, seed=7)
    save_params(tmp_path / "other" / "best", trained, cfg)
    _, fresh = create_model(cfg, seed=0)
    loaded = T.initial_params(cfg, fresh, None, str(tmp_path / "other"), drop_head=True)
    np.testing.assert_array_equal(loaded["head"]["kernel"], fresh["head"]["kernel"])
    np.testing.assert_array_equal(
        loaded["blocks"]["0"]["attn"]["qkv"]["kernel"],
        trained["blocks"]["0"]["attn"]["qkv"]["kernel"],
    )
    init = T.initial_params(cfg, fresh, str(tmp_path / "other" / "best"), None, drop_head=False)
    np.testing.assert_array_equal(init["head"]["kernel"], trained["head"]["kernel"])
    wider = small_cfg(dataset, "model.dim=96", "model.heads=3")
    with pytest.raises(
        T.TrainError, match=r"wrong shape: \['blocks'\]\['0'\]\['attn'\]\['qkv'\]\['kernel'\]"
    ):
        T.initial_params(
            wider, create_model(wider)[1], None, str(tmp_path / "other"), drop_head=True
        )


def test_init_from_timm_checkpoint(dataset, tmp_path):
    timm = pytest.importorskip("timm")
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    cfg = small_cfg(dataset)
    torch.manual_seed(0)
    m = timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, embed_dim=64, num_heads=2, depth=2
    )
    save_file(
        {k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "timm.safetensors")
    )
    _, fresh = create_model(cfg, seed=cfg.train.seed)
    params = T.initial_params(cfg, fresh, str(tmp_path / "timm.safetensors"), None, drop_head=False)
    qkv = m.blocks[1].attn.qkv.weight.detach().numpy().T
    np.testing.assert_array_equal(params["blocks"]["1"]["attn"]["qkv"]["kernel"], qkv)
    patch = m.patch_embed.proj.weight.detach().numpy().sum(axis=1)  # 3 input channels summed
    np.testing.assert_allclose(
        params["patch_embed"]["proj"]["kernel"], patch.reshape(64, -1).T, rtol=1e-6
    )
    np.testing.assert_array_equal(params["head"]["kernel"], fresh["head"]["kernel"])  # a new head


def _cli_error(capsys, *argv) -> str:
    assert T.main(["--no-progress", *argv]) == 2
    return capsys.readouterr().err


def test_user_errors_are_clear(dataset, tmp_path, capsys):
    def err(*argv):
        return _cli_error(capsys, *argv)

    assert "unknown config key 'train.lrr'" in err("--config", "demo", "--set", "train.lrr=1")
    assert "no_such_dir" in err("--config", "demo", "--data", str(tmp_path / "no_such_dir"))
    assert "--drop-head needs --load-from" in err("--config", "demo", "--drop-head")
    assert "does not exist" in err(
        "--config", "demo", "--data", str(dataset), "--load-from", str(tmp_path / "nope")
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("s00\nmissing_one\n")
    assert "missing_one" in err(
        "--config", "demo", "--data", str(dataset), "--train-list", str(ids)
    )


@pytest.mark.full
def test_a_finished_run_is_kept_and_resume_needs_the_same_config(dataset, uninterrupted, capsys):
    ref_dir, _ = uninterrupted
    assert "pass --resume" in _cli_error(capsys, *cli_args(dataset, ref_dir, *RESUME_SET))
    assert "config differs" in _cli_error(
        capsys, *cli_args(dataset, ref_dir, *RESUME_SET, "train.lr=2e-3"), "--resume"
    )


def test_vanished_gradients_are_reported(dataset, tmp_path, capsys):
    """An lr far too high saturates the output sigmoid: the gradients vanish, and the run says
    so."""
    T.train(small_cfg(dataset, "train.epochs=2", "train.lr=1.0"), tmp_path / "run", progress=False)
    norms = [
        json.loads(ln)["train/grad_norm"]
        for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "train/grad_norm" in ln
    ]
    assert min(norms) < T.VANISHED_GRAD_NORM
    err = capsys.readouterr().err
    assert err.count("gradients have vanished") == 1 and "train.lr (now 1)" in err


def test_depth_prior_starts_at_the_training_mean_profile(dataset, tmp_path):
    cfg = small_cfg(dataset, "model.depth_prior=true", "train.epochs=1")
    data = T.resolve_data(cfg, progress=False)
    profile = T.depth_profile(cfg, data)
    vp = [np.load(dataset / i / VELOCITY_FILE).astype(np.float64) for i in data.train_ids]
    np.testing.assert_allclose(profile, np.mean([v.mean(axis=0) for v in vp], 0), rtol=1e-9)
    graphdef, fresh = create_model(cfg)
    params = T.with_depth_prior(cfg, fresh, profile)
    params["head"] = jax.tree.map(jnp.zeros_like, params["head"])  # the head adds nothing
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 10000, 31)), jnp.float32)
    from flax import nnx

    v = nnx.merge(graphdef, params)(x)
    np.testing.assert_allclose(v, np.broadcast_to(profile[:, None], v.shape), atol=1e-5)
    # a fresh run sets it from the data; weights without one (timm's, another config's) get one
    summary = T.train(cfg, tmp_path / "run", data, progress=False)
    assert summary["steps"] == 4
    _, best = load_params(tmp_path / "run" / "best")
    start = T.with_depth_prior(cfg, fresh, profile)["depth_prior"]
    assert 0 < np.abs(best["depth_prior"] - start).max() < 0.05  # trained, from the profile
    plain = small_cfg(dataset)
    save_params(tmp_path / "plain" / "best", create_model(plain)[1], plain)
    init = T.initial_params(cfg, fresh, str(tmp_path / "plain" / "best"), None, drop_head=False)
    assert init["depth_prior"].shape == (1259,)
