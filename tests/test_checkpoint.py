"""Train-state checkpoints that go wrong: a damaged newest checkpoint, none intact, a save the disk
refuses, and output folders that cannot be written. A tiny state keeps each test well under a
second of checkpoint I/O.

The refused writes are real: the process's file-size limit (RLIMIT_FSIZE) makes the kernel fail
every write past it with EFBIG, as a full disk fails them with ENOSPC; where this process may mount
file systems (root with CAP_SYS_ADMIN), a 1 MiB tmpfs gives a really full disk and a read-only
tmpfs a really read-only directory."""

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import pathlib
import resource
import shutil
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from fwi_jax import checkpoint
from fwi_jax.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    TrainCheckpoints,
    load_params,
    save_params,
)
from fwi_jax.config import load_config
from fwi_jax.storage import StorageError, require_writable, write_atomic


def _state(k: float) -> dict:
    return {
        "params": {"w": jnp.arange(50_000, dtype=jnp.float32) + k, "b": jnp.full((3,), k)},
        "step": jnp.asarray(int(k), jnp.int32),
    }


def _run(directory, steps=(2, 4, 6), keep=3) -> TrainCheckpoints:
    ckpts = TrainCheckpoints(directory, keep=keep)
    for s in steps:
        ckpts.save(s, _state(s), {"position": s}, {"step": s})
    ckpts.wait()
    return ckpts


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` in one file fail with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_damaged_newest_is_named_set_aside_and_the_one_before_restored(tmp_path, monkeypatch):
    ckpts = _run(tmp_path / "ck")
    newest = _largest_file(ckpts.path(6) / "state")  # the params' array data
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as after a node failure
    (ckpts.path(4) / "meta" / "metadata").unlink()  # a metadata file lost
    ckpts = TrainCheckpoints(tmp_path / "ck", keep=3)
    assert ckpts.latest_step() == 6  # orbax still lists it: only reading it shows the damage
    monkeypatch.setattr(checkpoint, "_IN_FLIGHT", set())
    restore, quiet_while_reading = ckpts.restore, []

    def watched(step, target):
        # the filters are in place before a read starts: TensorStore's threads may print onto
        # orbax's closed loop before the failed restore's exception reaches restore_newest_intact
        quiet_while_reading.append(
            str(ckpts.path(step) / "state") in checkpoint._IN_FLIGHT
            and getattr(sys.unraisablehook, "fwi_jax_filter", False)
        )
        return restore(step, target)

    monkeypatch.setattr(ckpts, "restore", watched)
    said = []
    step, state, loader, meta = ckpts.restore_newest_intact(_state(0), log=said.append)
    assert quiet_while_reading == [True, True, True]
    # the damaged ones stay filtered (their reads may still finish); the intact one no longer is
    assert checkpoint._IN_FLIGHT == {str(tmp_path / "ck" / s / "state") for s in ("6", "4")}
    assert step == 2 and loader == {"position": 2} and meta == {"step": 2}
    np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
    assert len(said) == 2
    assert str(ckpts.path(6)) in said[0] and "is not valid for value of size 1000" in said[0]
    assert str(ckpts.path(4)) in said[1] and "meta/metadata not found" in said[1]
    # set aside (kept for inspection), so the resumed run can save steps 4 and 6 afresh
    assert (tmp_path / "ck" / "6.damaged").is_dir() and (tmp_path / "ck" / "4.damaged").is_dir()
    assert ckpts.all_steps() == [2]
    ckpts.save(4, _state(4), {}, {})
    ckpts.wait()
    assert ckpts.all_steps() == [2, 4]


def test_reads_and_writes_a_failure_abandoned_stay_off_stderr(tmp_path, monkeypatch, caplog):
    """After a restore of ``folder`` failed, the errors of the reads it left in flight (they name
    that folder, or are callbacks onto orbax's closed loop) are dropped, as are orbax's reports of
    a failed save; any other unraisable exception or log record still gets through."""
    seen, printed = [], []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(sys, "excepthook", lambda *a: printed.append(a[1]))
    monkeypatch.setattr(checkpoint, "_IN_FLIGHT", set())
    folder = tmp_path / "ck" / "6" / "state"
    checkpoint._quiet_abandoned_io(folder)

    def unraisable(exc):
        return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None)

    read = f"Encountered error while reading array index: (). Spec: {{'path': '{folder}/'}}"
    sys.unraisablehook(unraisable(Exception(read)))
    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    assert seen == []
    other = unraisable(ValueError("something else"))
    sys.unraisablehook(other)
    assert seen == [other]

    # the closed loop reached through other standard-library frames (here contextlib's) is dropped
    # too; raised from our own code it gets through
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(loop.call_soon_threadsafe, print)
    except RuntimeError as e:
        closed = e
    library_only = types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=closed, exc_traceback=closed.__traceback__.tb_next
    )
    sys.unraisablehook(library_only)
    assert seen == [other]
    ours = types.SimpleNamespace(
        exc_type=RuntimeError, exc_value=closed, exc_traceback=closed.__traceback__
    )
    sys.unraisablehook(ours)
    assert seen == [other, ours]

    # TensorStore's threads print a callback's error through sys.excepthook: dropped when only
    # library frames raised it; an uncaught error from our own frames still prints
    sys.excepthook(RuntimeError, closed, closed.__traceback__.tb_next)
    assert printed == []
    sys.excepthook(RuntimeError, closed, closed.__traceback__)
    assert printed == [closed]

    log = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        lost = ValueError(f'OUT_OF_RANGE: Error reading "w/0" at local file "{folder}/"')
        log.error("Future exception was never retrieved", exc_info=lost)
        log.error("Future exception was never retrieved", exc_info=ValueError("elsewhere"))
    assert [str(r.exc_info[1]) for r in caplog.records] == ["elsewhere"]

    # a finished read posting onto the loop as it closes: concurrent.futures logs the callback's
    # error (asyncio checked is_closed() a moment before); the closed loop alone, no path in it
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        read_done = concurrent.futures.Future()
        read_done.add_done_callback(functools.partial(loop.call_soon_threadsafe, print))
        read_done.set_result(None)
        mine = concurrent.futures.Future()
        mine.add_done_callback(lambda f: loop.call_soon_threadsafe(print))  # our own frame
        mine.set_result(None)
    assert [str(r.exc_info[1]) for r in caplog.records] == ["Event loop is closed"]
    assert caplog.records[0].exc_info[2].tb_next.tb_frame.f_code.co_name == "<lambda>"

    # orbax's own report of a failed background write into a step folder in flight (the "absl"
    # logger) is dropped; one naming checkpoint 60, not in flight, gets through
    caplog.clear()
    step = tmp_path / "ck" / "6"
    checkpoint._quiet_abandoned_io(step)
    with caplog.at_level(logging.WARNING, logger="absl"):
        for s in (step, tmp_path / "ck" / "60"):
            logging.getLogger("absl").error(
                f"Failed to run 5 Handler Commit operations in background save thread, "
                f"directory: {s}"
            )
        logging.getLogger("absl").error(f'Error writing "w/0" at "{step}.orbax-checkpoint-tmp/"')
        logging.getLogger("absl").warning(f"Waiting for {step} to be written")  # not an error
    assert [r.getMessage()[-3:] for r in caplog.records] == ["/60", "ten"]
    checkpoint._done(step)
    assert str(step) not in checkpoint._IN_FLIGHT


def test_none_intact_refuses_with_every_reason(tmp_path):
    ckpts = _run(tmp_path / "ck", steps=(2, 4))
    shutil.rmtree(ckpts.path(4) / "state")
    f = _largest_file(ckpts.path(2) / "state")
    f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(CheckpointError) as e:
        TrainCheckpoints(tmp_path / "ck").restore_newest_intact(_state(0), log=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and "no intact checkpoint" in msg
    assert f"{ckpts.path(4)}: " in msg and '\'Item "state" was not found' in msg
    assert f"{ckpts.path(2)}: " in msg
    assert not list((tmp_path / "ck").glob("*.damaged"))  # nothing renamed when nothing restores


def test_refused_write_names_the_failing_save_and_keeps_the_previous(tmp_path):
    ckpts = _run(tmp_path / "ck", steps=(2,), keep=1)
    with file_size_limit(50_000):  # the 200 kB array file cannot be written
        ckpts.save(4, _state(4), {"position": 4}, {"step": 4})  # fails in the background
        with pytest.raises(CheckpointSaveError) as e:
            ckpts.wait()
    msg = str(e.value)
    assert f"saving checkpoint {ckpts.path(4)} failed" in msg and "File too large" in msg
    assert f"the newest complete checkpoint, {ckpts.path(2)}, is untouched" in msg
    fresh = TrainCheckpoints(tmp_path / "ck", keep=1)
    assert fresh.all_steps() == [2]
    step, state, loader, _ = fresh.restore_newest_intact(_state(0))
    assert step == 2 and loader == {"position": 2}
    np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])


def test_refused_params_save_keeps_the_previous(tmp_path):
    cfg = load_config("demo")
    save_params(tmp_path / "best", {"w": np.ones(50_000, np.float32)}, cfg)
    with file_size_limit(50_000), pytest.raises(CheckpointSaveError, match="File too large") as e:
        noise = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)  # 200 kB zstd
        save_params(tmp_path / "best", {"w": noise}, cfg)
    assert f"{(tmp_path / 'best').resolve()} is untouched" in str(e.value)
    np.testing.assert_array_equal(load_params(tmp_path / "best")[1]["w"], 1.0)


def test_full_disk_is_refused_before_writing(tmp_path, mount_tmpfs):
    disk = mount_tmpfs(tmp_path / "disk", "size=1m")
    ckpts = TrainCheckpoints(disk / "ck", keep=1)
    ckpts.save(2, _state(2), {}, {})
    ckpts.wait()
    big = {"params": {"w": jnp.zeros(400_000, jnp.float32)}}  # 1.6 MB > the disk
    full = r"MB free on its disk, the train state needs 1\.6 MB"
    with pytest.raises(CheckpointSaveError, match=full):
        ckpts.save(4, big, {}, {})
    assert TrainCheckpoints(disk / "ck").all_steps() == [2]


def test_write_probe_names_the_unwritable_path(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=r"^--workdir .*/file/run is not writable: Not a dir"):
        require_writable(tmp_path / "file" / "run", "--workdir")
    assert require_writable(tmp_path / "new" / "run", "--out folder") == tmp_path / "new" / "run"
    assert list((tmp_path / "new" / "run").iterdir()) == []  # the probe file is gone


def test_atomic_write_shows_readers_the_old_file_until_the_new_one_is_whole(tmp_path):
    """What a resumed run's other processes rely on when process 0 rewrites config.json: while
    the new content is being written the path still reads as the old file, a failed write leaves
    it untouched, and no temporary file stays behind."""
    path = tmp_path / "run" / "config.json"
    write_atomic(path, '{"old": 1}')
    seen = []

    def write(f):
        f.write(b'{"new":')  # half a file, as a reader of a plain write_text could see it
        seen.append(path.read_text())
        f.write(b" 2}")

    write_atomic(path, write)
    assert seen == ['{"old": 1}'] and path.read_text() == '{"new": 2}'

    def fail(f):
        f.write(b"{")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomic(path, fail)
    assert path.read_text() == '{"new": 2}'
    assert [q.name for q in path.parent.iterdir()] == ["config.json"]
    write_atomic(path, b"\x00")
    assert path.read_bytes() == b"\x00"
    umask = os.umask(0o022)
    try:  # the permissions of a plain write under the umask (not mkstemp's owner-only 0o600)
        write_atomic(path, "{}")
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_write_probe_on_a_read_only_mount(tmp_path, mount_tmpfs):
    ro = mount_tmpfs(tmp_path / "ro", "ro,size=1m")
    with pytest.raises(StorageError, match=r"^--workdir .*/ro is not writable: Read-only file sys"):
        require_writable(ro, "--workdir")
