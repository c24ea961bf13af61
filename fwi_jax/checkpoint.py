"""Orbax checkpoints.

Two layouts, both plain pytrees of arrays plus the resolved config as JSON:

- a *params checkpoint* (``save_params``/``load_params``): ``DIR/params`` (orbax) and
  ``DIR/config.json``; written by ``python -m fwi_jax.convert`` and by training for its best
  model, read by inference and ``--init-from``/``--load-from``;
- *train-state checkpoints* (``TrainCheckpoints``): everything a run needs to continue exactly
  (params, optimiser state, EMA, loss scale, step, RNG in one pytree; the grain iterator state and
  run metadata as JSON), one folder per step under ``WORKDIR/checkpoints``, saved asynchronously by
  an orbax ``CheckpointManager`` that keeps the newest N. Orbax writes each step under a
  temporary name and renames it when complete, so a checkpoint half-written by a crash is never
  listed, let alone loaded. A listed checkpoint damaged later (a truncated or missing file after a
  node failure) is found by restoring it: `TrainCheckpoints.restore_newest_intact` moves it aside
  as ``<step>.damaged`` and falls back to the newest one that restores. A save that fails (a full
  disk) raises `CheckpointSaveError` naming it; the checkpoints before it stay intact. Either
  way that one line is all: the reports of orbax's and TensorStore's threads about the I/O the
  failure abandoned are kept off stderr.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import shutil
import sys
import sysconfig
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fwi_jax.config import Config, from_dict
from fwi_jax.storage import free_bytes

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"


def save_params(path: str | pathlib.Path, params: Any, cfg: Config) -> pathlib.Path:
    """Write ``params`` (a pytree of float32 arrays) and ``cfg`` to ``path``, replacing it
    atomically: written beside it under a temporary name, then swapped in. In a multi-process run
    every process calls it (orbax's save is collective); process 0 writes the files."""
    from jax.experimental import multihost_utils

    path = pathlib.Path(path).expanduser().resolve()
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    primary = jax.process_index() == 0
    try:
        if primary:
            for p in (tmp, old):
                shutil.rmtree(p, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / CONFIG_FILE).write_text(cfg.to_json())
        multihost_utils.sync_global_devices(f"fwi_jax save_params {path}: folder ready")
        _quiet_abandoned_io(tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, jax.device_get(params))
        _done(tmp)
    except Exception as e:  # a full disk: TensorStore raises ValueError, Python OSError
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"{path} is untouched" if path.exists() else "nothing was written"
        raise CheckpointSaveError(
            f"saving params checkpoint {path} failed: {describe_error(e)}; {kept}"
        ) from e
    if primary:
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    multihost_utils.sync_global_devices(f"fwi_jax save_params {path}: swapped in")
    return path


def is_params_checkpoint(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path).expanduser()
    return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def load_params(path: str | pathlib.Path) -> tuple[Config, Any]:
    """Read a params checkpoint: (config, params as NumPy arrays in a nested dict)."""
    path = pathlib.Path(path).expanduser().resolve()
    if not is_params_checkpoint(path):
        raise FileNotFoundError(
            f"{path} is not a params checkpoint: expected {path / PARAMS_DIR}/ and "
            f"{path / CONFIG_FILE}"
        )
    cfg = from_dict(json.loads((path / CONFIG_FILE).read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / PARAMS_DIR)
    params = jax.tree.map(np.asarray, params)
    return cfg, params


class CheckpointError(ValueError):
    """No checkpoint of a run can be restored; the message lists each one and what is wrong."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written; the message names it and the newest intact one."""


def describe_error(e: BaseException, limit: int = 400) -> str:
    """One line for an exception raised while reading or writing a checkpoint: the innermost cause
    (TensorStore's own error, e.g. 'OUT_OF_RANGE: Error reading "params.head.kernel/0" ...:
    Requested byte range [0, 268719) is not valid for value of size 1000'), without the
    TensorStore spec that orbax appends."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e) or type(e).__name__
    for cut in (" See full TensorStore details", " [tensorstore_spec", "\n"):
        text = text.split(cut)[0]
    text = text.strip()  # long ones end with the OS's reason ("File too large"): keep both ends
    return text if len(text) <= limit else text[: limit // 3] + " ... " + text[-(2 * limit) // 3 :]


# checkpoint folders whose read or write is in flight, or failed, in this process
_IN_FLIGHT: set[str] = set()
_STDLIB = sysconfig.get_paths()["stdlib"]


def _names_a_folder_in_flight(text: str) -> bool:
    """Whether ``text`` names one of those folders, or a file or a temporary name in it (orbax
    writes ``<step>.orbax-checkpoint-tmp``); checkpoint ``2`` is not checkpoint ``20``."""
    return any(re.search(re.escape(f) + r"(?![\w-])", text) for f in _IN_FLIGHT)


def _is_abandoned_io(exc: BaseException | None, tb=None) -> bool:
    """An error of checkpoint I/O that nobody receives: orbax gives up at the first array that
    fails while TensorStore completes the others, which then report errors (as abandoned
    coroutines, futures never retrieved, or callbacks onto orbax's closed loop)."""
    if exc is None:
        return False
    text = str(exc)
    if _names_a_folder_in_flight(text):  # TensorStore names the file it read or wrote
        return True
    return bool(_IN_FLIGHT) and _in_libraries(tb) and text == "Event loop is closed"


def _in_libraries(tb) -> bool:
    """Whether a traceback has library frames only: installed packages or the standard library
    (asyncio, and the concurrent.futures callbacks that post a finished read onto orbax's loop)."""
    while tb is not None:
        f = tb.tb_frame.f_code.co_filename
        if not ("site-packages" in f or f.startswith(_STDLIB)):
            return False
        tb = tb.tb_next
    return True


class _AbandonedIOFilter(logging.Filter):
    """asyncio's 'Future exception was never retrieved' for those reads and writes, orbax's own
    error reports of its background threads (the "absl" logger), and concurrent.futures'
    'exception calling callback' when a read finishing on TensorStore's thread posts its result
    onto orbax's loop just as that loop closes (asyncio checks the loop, then calls into it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:  # orbax's progress and warnings pass
            return True
        exc, tb = record.exc_info[1:] if record.exc_info else (None, None)
        return not (_is_abandoned_io(exc, tb) or _names_a_folder_in_flight(record.getMessage()))


def _quiet_abandoned_io(folder: pathlib.Path) -> None:
    """Keep the library reports of a failed read or write of ``folder`` out of stderr, where they
    would print pages of TensorStore specs and orbax tracebacks around the one line that names
    the damaged checkpoint or the refused save. Called before the I/O starts: TensorStore's and
    orbax's threads report a failure before its exception reaches our caller. Written by hand:
    neither orbax nor TensorStore can cancel the I/O in flight or silence its reports. Every
    other unraisable exception, uncaught exception and log record passes as before."""
    _IN_FLIGHT.add(str(folder))
    previous = sys.unraisablehook
    if getattr(previous, "fwi_jax_filter", False):
        return

    def hook(unraisable):
        if not _is_abandoned_io(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    def excepthook(exc_type, exc, tb):
        # a callback of TensorStore's threads that raised is printed through sys.excepthook
        # (a bare traceback); only library frames, so an uncaught error of ours still prints
        if not (_in_libraries(tb) and _is_abandoned_io(exc, tb)):
            previous_excepthook(exc_type, exc, tb)

    hook.fwi_jax_filter = True
    sys.unraisablehook = hook
    previous_excepthook = sys.excepthook
    sys.excepthook = excepthook
    for name in ("asyncio", "concurrent.futures", "absl"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _AbandonedIOFilter) for f in log.filters):
            log.addFilter(_AbandonedIOFilter())
    for coroutine in ("_read_array_index_and_device_put", r"async_serialize_from_host\.<locals>"):
        warnings.filterwarnings("ignore", rf"coroutine '{coroutine}.*' was never awaited")


def _done(folder: pathlib.Path) -> None:
    """``folder``'s I/O completed: it leaves nothing in flight, its reports are not filtered."""
    _IN_FLIGHT.discard(str(folder))


def _nbytes(tree: Any) -> int:
    return sum(
        int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)
    )


class TrainCheckpoints:
    """Train-state checkpoints of one run: ``DIR/<step>/{state, loader, meta}``.

    ``state`` is the train-state pytree (restored onto the shardings of the target you pass),
    ``loader`` the grain iterator state, ``meta`` a JSON dict (epoch, best MAPE, config ...)."""

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, asynchronous: bool = True):
        self.directory = pathlib.Path(directory).expanduser().resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, keep), create=True, enable_async_checkpointing=asynchronous
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "loader", "meta")
        )
        self._pending: int | None = None  # step of the save in flight

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def path(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, loader_state: dict, meta: dict) -> None:
        """Start saving (returns once the arrays are copied off the devices). Raises
        CheckpointSaveError when the previous save failed, or when the disk has less room than
        the state's size (orbax writes the new step in full before it deletes the oldest)."""
        self.wait()
        need, free = _nbytes(state), free_bytes(self.directory)
        if free < need:
            raise self._save_failed(
                step,
                f"{free / 1e6:.1f} MB free on its disk, the train state needs {need / 1e6:.1f} MB",
            )
        _quiet_abandoned_io(self.path(step))
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    loader=ocp.args.JsonSave(loader_state),
                    meta=ocp.args.JsonSave(meta),
                ),
            )
        except Exception as e:
            raise self._save_failed(step, describe_error(e)) from e
        self._pending = step

    def _save_failed(self, step: int, reason: str) -> CheckpointSaveError:
        self._manager.reload()  # after a failed save, its list of steps may be off: read the disk
        kept = [s for s in self.all_steps() if s != step]
        intact = (
            f"the newest complete checkpoint, {self.path(max(kept))}, is untouched"
            if kept
            else "no checkpoint of this run was complete before it"
        )
        return CheckpointSaveError(
            f"saving checkpoint {self.path(step)} failed: {reason}; {intact}"
        )

    def restore_newest_intact(self, target: Any, log=print) -> tuple[int, Any, dict, dict]:
        """(step, state, loader_state, meta) of the newest checkpoint that restores. Each newer one
        that fails (a truncated array file, a missing metadata file ...) is reported through
        ``log`` with what is wrong and renamed ``<step>.damaged`` (orbax no longer lists it, so
        the resumed run saves that step afresh). Raises CheckpointError when none restores."""
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            folder = self.path(step) / "state"
            _quiet_abandoned_io(folder)
            try:
                state, loader_state, meta = self.restore(step, target)
            except Exception as e:  # orbax/TensorStore raise many types for one cause: bad files
                reason = describe_error(e)
                damaged.append((step, reason))
                log(
                    f"warning: checkpoint {self.path(step)} is damaged ({reason}); "
                    "trying the one before"
                )
                continue
            _done(folder)
            self._set_aside([s for s, _ in damaged])
            return step, state, loader_state, meta
        if not damaged:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        listing = "; ".join(f"{self.path(s)}: {r}" for s, r in damaged)
        raise CheckpointError(
            f"no intact checkpoint in {self.directory} ({listing}); "
            f"start a new run in another --workdir"
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged step folders to ``<step>.damaged[.k]`` (kept for inspection)."""
        if not steps:
            return
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fwi_jax: damaged checkpoints read")  # all hosts tried
        if jax.process_index() == 0:
            for step in steps:
                dest, k = self.directory / f"{step}.damaged", 1
                while dest.exists():
                    dest, k = self.directory / f"{step}.damaged.{k}", k + 1
                self.path(step).rename(dest)
        multihost_utils.sync_global_devices("fwi_jax: damaged checkpoints set aside")
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True at the step where all hosts agreed to stop after a preemption notice (SIGTERM to
        any host; JAX's preemption service, started by ``jax.distributed.initialize``). Always
        False in a single process, which has no such service."""
        return self._manager.reached_preemption(step)

    def restore(self, step: int, target: Any) -> tuple[Any, dict, dict]:
        """(state, loader_state, meta) of ``step``; ``target`` gives the structure, shapes and
        shardings (the freshly initialised state, or ``jax.eval_shape`` of it)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                loader=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out.state, out.loader, out.meta

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk; CheckpointSaveError if one failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            step, self._pending = self._pending, None
            raise self._save_failed(step, describe_error(e)) from e
        if self._pending is not None:
            _done(self.path(self._pending))
        self._pending = None

    def close(self) -> None:
        self._manager.close()
