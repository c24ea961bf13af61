"""What a training run records as it goes: ``metrics.jsonl`` and TensorBoard event files.

Both receive the same records (train/loss, train/grad_norm, lr, loss_scale, skipped_steps,
samples_per_s, val/mape, ...); TensorBoard also gets, at every validation, one held-out sample as
an image: true velocity | prediction | relative error. The event files lie in the work directory
itself, so ``tensorboard --logdir runs`` shows each work directory under ``runs/`` as one run.

On ``--resume`` from step S, JSON lines past S are dropped, and the new event file starts with
TensorBoard's purge marker at S + 1: TensorBoard discards what an earlier process logged past S
(the steps the resumed run repeats), so no step appears twice. The events are written with
tensorboardX, which writes TensorBoard's format without TensorFlow; viewing them needs the
``tensorboard`` package (``pip install tensorboard``).
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
import time

import numpy as np

EVENT_GLOB = "events.out.tfevents.*"
GAP_PX = 4  # white columns between the image's three panels


class MetricsLog:
    """Appends JSON lines to ``path``; on resume, lines past the restored step are dropped first."""

    def __init__(self, path: pathlib.Path, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.t0 = time.perf_counter()  # wall_s of each record counts from here
        if enabled and resume_step is not None and path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif enabled and resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> dict:
        """Writes ``record`` with its ``wall_s``; returns the record as written."""
        record = {**record, "wall_s": round(time.perf_counter() - self.t0, 2)}
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record


class EventLog:
    """TensorBoard event files in ``folder``: every numeric field of a record as a scalar at its
    ``step``, and validation images. ``resume_step``: None for a new run (earlier event files in
    ``folder`` are removed, as metrics.jsonl is emptied), else the step the run resumes from.

    Written synchronously with tensorboardX's ``EventsWriter`` and flushed after each record, as
    metrics.jsonl is: its ``SummaryWriter`` queues events for a background thread whose ``flush()``
    does not drain the queue, so a killed process (``kill -9``, the OOM killer) would lose the
    records of its last ``flush_secs`` that metrics.jsonl holds."""

    def __init__(self, folder: pathlib.Path, resume_step: int | None, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self._event = Event
        if resume_step is None:
            for old in folder.glob(EVENT_GLOB):
                old.unlink()
        # the pid keeps a resumed process started within the same second off the earlier file
        self.writer = EventsWriter(str(folder / "events"), filename_suffix=f".{os.getpid()}")
        if resume_step is not None:  # TensorBoard drops the earlier files' events from here on
            start = SessionLog(status=SessionLog.START)
            self._put(Event(step=resume_step + 1, session_log=start))

    def _put(self, event) -> None:
        event.wall_time = time.time()
        self.writer.write_event(event)
        self.writer.flush()

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        values = [
            Summary.Value(tag=key, simple_value=float(value))
            for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real)
        ]
        self._put(self._event(step=int(record["step"]), summary=Summary(value=values)))

    def image(self, tag: str, step: int, truth: np.ndarray, pred: np.ndarray) -> None:
        """One sample (depth, x) km/s as truth | prediction | relative error, depth downwards."""
        if self.writer is not None:
            from tensorboardX.summary import image

            png = image(tag, comparison_image(truth, pred), dataformats="HWC")
            self._put(self._event(step=step, summary=png))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def comparison_image(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(depth, 3 x + 2 gaps, 3) uint8: truth and prediction on one velocity colour scale
    (viridis), then |pred - truth| / truth from 0 to its 99.5th percentile (magma)."""
    from matplotlib import colormaps

    truth, pred = np.asarray(truth, np.float32), np.asarray(pred, np.float32)
    lo, hi = float(min(truth.min(), pred.min())), float(max(truth.max(), pred.max()))
    rel = np.abs(pred - truth) / (np.abs(truth) + 1e-8)
    top = float(np.percentile(rel, 99.5)) or 1e-6

    def paint(a: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
        scaled = np.clip((a - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
        return (colormaps[cmap](scaled)[..., :3] * 255).astype(np.uint8)

    gap = np.full((truth.shape[0], GAP_PX, 3), 255, np.uint8)
    return np.concatenate(
        [
            paint(truth, "viridis", lo, hi),
            gap,
            paint(pred, "viridis", lo, hi),
            gap,
            paint(rel, "magma", 0.0, top),
        ],
        axis=1,
    )


class RunLog:
    """metrics.jsonl and TensorBoard event files of one work directory, written by process 0."""

    def __init__(self, workdir: pathlib.Path, resume_step: int | None, enabled: bool = True):
        self.metrics = MetricsLog(workdir / "metrics.jsonl", resume_step, enabled)
        self.events = EventLog(workdir, resume_step, enabled)

    def write(self, record: dict) -> None:
        self.events.write(self.metrics.write(record))

    def image(self, step: int, truth: np.ndarray, pred: np.ndarray) -> None:
        self.events.image("val/sample0", step, truth, pred)

    def close(self) -> None:
        self.events.close()
