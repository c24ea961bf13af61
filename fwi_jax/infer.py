"""``python -m fwi_jax.infer``: ensemble inference with flip TTA, sharded over devices, written to
one competition submission file (reference §1, §2.4, §5).

    python -m fwi_jax.infer --data DIR [--list ids.txt] --checkpoints C1 C2 ... --out submission.npz
    \
        [--config NAME] [--no-tta] [--dtype bfloat16] [--batch 8] [--val] [--uncertainty] [--plot K]
    python -m fwi_jax.infer --data DIR --ensemble ensemble.json --out submission.npz

DIR: a folder of sample folders, or a packed store (``python -m fwi_jax.data pack``; a float16
store's batches reach the device as float16 and are cast to float32 there, exactly).

Members (``fwi_jax.members``): a params checkpoint (``fwi_jax.checkpoint.save_params``; carries
its config), a training run directory (its best params, EMA when active), or a PyTorch
``state_dict`` of the reference solution (``.pth``/``.pt`` read with
``torch.load(weights_only=True)``, or ``.safetensors``), converted on the fly for ``--config``.
An ensemble file is a JSON list of
``{"checkpoint": PATH, "config": NAME or null, "weight": 1.0}``; relative paths are taken from
the ensemble file's folder.

How it runs: the ensemble is one jitted program (``fwi_jax.ensemble``: members of one network
stacked and vmapped, flip TTA ``½(f(x) + unflip f(flip x))``, the weighted mean). Batches are
sharded over every device on a 1-D ``data`` mesh (params replicated); each host reads only its slice
of every global batch; reading runs in background threads (grain) while the devices compute. The
last batch is padded to the global batch (one compiled shape) and the padding dropped.

``--uncertainty`` (`fwi_jax.uncertainty`): a confidence map per pixel, the expected relative
error (the spread over members x TTA views, and the members' error heads), written float16 to
OUT_uncertainty.npz (key = id, (x, depth)), its mean per sample to the per-sample CSV; with
``--val`` how well it ranks the errors (Spearman over samples, deciles of pixels), printed and in
OUT_uncertainty.json. One member with ``--no-tta`` and no error head has nothing to measure: an
error.

Every input folder is checked before any compute (a packed store: its index, arrays, ids and, with
``--val``, velocities; its samples were checked when it was packed); a bad sample stops the run with
an error that names it. The submission (key = sample id, float64 (300, 1259) (x, depth)) is written
once, at the end, atomically, by ``fwi_jax.data.io.write_submission``: a failed run leaves no file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fwi_jax import physics
from fwi_jax import uncertainty as unc
from fwi_jax.config import Config, ConfigError, add_override_argument, apply_overrides
from fwi_jax.data import io as data_io
from fwi_jax.ensemble import Predictor, group_members
from fwi_jax.host import tune_cpu_host
from fwi_jax.loss import competition_mape
from fwi_jax.members import MemberError, MemberSpec, load_member, read_ensemble_file
from fwi_jax.sharding import fail, initialize_distributed
from fwi_jax.storage import StorageError, require_writable

DTYPES = ("float32", "bfloat16", "float16")


class InferenceError(ValueError):
    """A user error (bad member, config, id list or sample); the message names the culprit."""


def default_batch(device: jax.Device) -> int:
    """``python -m fwi_jax.infer``'s global batch when ``--batch`` is not given: 1 on CPU (see
    `fwi_jax.ensemble.default_tta_in_batch`), 4 elsewhere."""
    return 1 if device.platform == "cpu" else 4


# ---------------------------------------------------------------------------------------------
# Samples: ids and checks


def check_samples(
    root: pathlib.Path,
    ids: Sequence[str],
    need_velocity: bool,
    v_range=(0.5, 10.0),
    progress: bool = True,
) -> None:
    """Validate every sample (``fwi_jax.data.io.check_dataset``) before any compute; raise naming
    every bad one (up to 20 listed). A packed store was validated sample by sample when it was
    packed: here its index, arrays and ids are checked, velocities are required with
    ``need_velocity``, and each sample's velocities are checked again only when ``v_range`` is
    narrower than the range the store was packed with."""
    from fwi_jax.data import pack

    if data_io.is_packed(root):
        try:
            bad = pack.PackedSource(
                root, ids, v_range=v_range, require_velocity=need_velocity or None
            ).check()
        except (data_io.DataError, OSError) as e:  # the store itself: index, arrays, no velocities
            raise InferenceError(f"{e}; nothing was computed") from None
    else:
        bad = data_io.check_dataset(
            root, ids, v_range=v_range, require_velocity=need_velocity or None, progress=progress
        )
    if bad:
        lines = [f"  {sample_id}: {message}" for sample_id, message in bad[:20]]
        raise InferenceError(
            f"{len(bad)} bad sample(s) of {len(ids)}; nothing was computed:\n"
            + "\n".join(lines)
            + ("\n  ..." if len(bad) > 20 else "")
        )


def _progress(enabled: bool, desc: str, total: int):
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="sample", dynamic_ncols=True, disable=not enabled)


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Result:
    predictions: dict[str, np.ndarray]  # id -> float64 (x, depth), the submission's layout
    mape: dict[str, float]  # id -> competition MAPE (--val only), in input order
    kept: dict[str, dict[str, Any]]  # first --plot samples: {"x", "v" or None, "pred" (depth, x)}
    seconds: float
    # samples after the first batch, their seconds (no compile)
    steady: tuple[int, float] = (0, 0.0)
    # --uncertainty: id -> confidence map float16 (depth, x); with --val also id -> relative error
    maps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    errors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    scores: dict[str, float] = dataclasses.field(default_factory=dict)  # the maps' means (float32)


def predict_samples(
    predictor: Predictor,
    root: pathlib.Path,
    ids: Sequence[str],
    batch: int,
    *,
    val: bool = False,
    keep: int = 0,
    workers: int = 0,
    prefetch: int = 2,
    progress: bool = True,
) -> Result:
    """Run the ensemble over the (already checked) samples ``ids`` under ``root`` in global
    batches of ``batch``. One batch stays in flight: batch k+1 is dispatched before batch k's
    result is fetched, so host work (reading, MAPE, float64 copies) overlaps device compute.
    A `Predictor` made with ``uncertainty`` also gives each sample's confidence map (and, with
    ``val``, its relative error per pixel, for `fwi_jax.uncertainty.rank_stats`)."""
    from fwi_jax.data.pipeline import global_batch_ids, host_batches

    n_hosts = jax.process_count()
    if n_hosts > 1 and (val or keep):
        raise InferenceError(
            "--val and --plot run on one host only (they need every sample's data)"
        )
    cfg = predictor.groups[0].cfg
    preds: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    kept: dict[str, dict[str, Any]] = {}
    maps: dict[str, np.ndarray] = {}
    scores_u: dict[str, float] = {}
    clipped = [0]
    errors: dict[str, np.ndarray] = {}
    bar = _progress(progress, "infer", len(ids))
    t0 = time.perf_counter()
    first: list = []  # (samples, time) when the first batch's result was computed

    def finish(k, host, y):
        out = Predictor.fetch(y)
        if predictor.uncertainty:
            out, conf = out
        gids = global_batch_ids(ids, k, batch // n_hosts, n_hosts)
        if n_hosts == 1:  # the loader's own ids must be the ones we expect
            assert [str(i) for i in host["id"]] == [g or "" for g in gids], (host["id"], gids)
        for j, sid in enumerate(gids):
            if sid is None:
                continue
            preds[sid] = out[j].T.astype(np.float64)
            if val:
                scores[sid] = competition_mape(host["v"][j], out[j])
            if predictor.uncertainty:
                scores_u[sid] = unc.sample_score(conf[j])  # from float32, before storing
                maps[sid], n_over = unc.to_float16(conf[j])
                clipped[0] += n_over
                if val:
                    v = np.asarray(host["v"][j], np.float64)
                    errors[sid] = (np.abs(out[j] - v) / (v + 1e-8)).astype(np.float16)
            if len(kept) < keep:
                kept[sid] = {"x": host["x"][j], "v": host["v"][j] if val else None, "pred": out[j]}
                if predictor.uncertainty:
                    kept[sid]["confidence"] = maps[sid]
            bar.update(1)
        if val:
            bar.set_postfix(mape=f"{np.mean(list(scores.values())):.5f}")

    pending = None
    batches = host_batches(
        cfg, root, ids, batch_size=batch, velocity=val, workers=workers, prefetch=prefetch
    )
    for k, host in enumerate(batches):
        y = predictor.dispatch(host["x"])
        if k == 0:  # the steady rate starts when the first batch (and compilation) is done: the
            # next batch is dispatched only after this, and with synchronous dispatch (the CPU
            # tuning) it is computed inside its dispatch call, before the first one's finish()
            jax.block_until_ready(y)
            real = sum(g is not None for g in global_batch_ids(ids, 0, batch // n_hosts, n_hosts))
            first.append((real, time.perf_counter()))
        if pending is not None:
            finish(*pending)
        pending = (k, host, y)
    if pending is not None:
        finish(*pending)
    bar.close()
    if len(preds) != len(ids):
        raise InferenceError(f"internal: {len(preds)} predictions for {len(ids)} samples")
    end = time.perf_counter()
    steady = (len(preds) - first[0][0], end - first[0][1]) if first else (0, 0.0)
    if clipped[0]:
        print(
            f"--uncertainty: {clipped[0]} pixel(s) of the map above float16's largest value "
            f"({unc.FLOAT16_MAX:.0f}) are stored as it (their samples' scores are not clipped)"
        )
    return Result(
        preds,
        {i: scores[i] for i in ids} if val else {},
        kept,
        end - t0,
        steady,
        maps,
        errors,
        {i: scores_u[i] for i in ids} if predictor.uncertainty else {},
    )


def check_measurable(groups: Sequence[Any], tta: bool) -> None:
    """``--uncertainty`` needs something to measure: several members, TTA, or an error head."""
    n_members = sum(len(g.sources) for g in groups)
    if n_members == 1 and not tta and not any(g.cfg.model.error_head for g in groups):
        raise InferenceError(
            "--uncertainty: nothing to measure: one member, no TTA (--no-tta) and no error head; "
            "give several members, drop --no-tta, or use members trained with "
            "model.error_head=true"
        )


def report_uncertainty(
    out: pathlib.Path,
    csv: pathlib.Path,
    groups: Sequence[Any],
    tta: bool,
    result: Result,
    rows: dict[str, dict[str, Any]],
) -> None:
    """Write the confidence maps (float16 (x, depth), their own .npz beside the submission), add
    each sample's score to the CSV ``rows``, print and write (OUT_uncertainty.json) the mean
    score and, with labels, how well the confidence ranks the errors."""
    n_views = sum(len(g.sources) for g in groups) * (2 if tta else 1)
    what = unc.what_is_measured(n_views, any(g.cfg.model.error_head for g in groups))
    maps_file = unc.map_path(out)
    unc.write_maps(maps_file, {i: m.T for i, m in result.maps.items()})
    scores = result.scores
    for i, sc in scores.items():
        rows[i]["uncertainty"] = sc
    stats: dict[str, Any] = {
        "map": what,
        "maps": str(maps_file),
        "mean_score": float(np.mean(list(scores.values()))),
    }
    print(
        f"uncertainty: {what}; mean score {stats['mean_score']:.5f} (per sample: {csv}); "
        f"maps: {maps_file} (float16 (x, depth))"
    )
    if result.errors:
        stats.update(unc.rank_stats(scores, result.mape, result.maps, result.errors))
        dec = " ".join(f"{d:.4f}" for d in stats["decile_mean_relative_error"])
        rho = stats["spearman_score_mape"]
        rho = "undefined" if rho is None else f"{rho:+.3f}"
        print(
            f"uncertainty vs error over {stats['samples']} samples: Spearman(score, MAPE) "
            f"{rho}; mean relative error per decile of the map "
            f"(lowest first): {dec}; top decile {stats['top_decile_ratio']:.2f}x the mean "
            f"{stats['mean_relative_error']:.4f}"
        )
    unc.stats_path(out).write_text(json.dumps(stats, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m fwi_jax.infer",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Ensemble file: JSON list of {"checkpoint": PATH, "config": NAME|null, '
        '"weight": 1.0}',
    )
    ap.add_argument(
        "--data",
        required=True,
        help="folder of sample folders (competition format), or a packed "
        "store (python -m fwi_jax.data pack)",
    )
    ap.add_argument("--list", help="text file of sample ids, one per line (default: every sample)")
    members = ap.add_mutually_exclusive_group(required=True)
    members.add_argument(
        "--checkpoints",
        nargs="+",
        metavar="CKPT",
        help="params checkpoints, training runs, or reference state_dicts (.pth/.pt/.safetensors)",
    )
    members.add_argument(
        "--ensemble", help="JSON ensemble file (config, checkpoint, weight per member)"
    )
    ap.add_argument(
        "--config", help="config (name or path) of members that carry none (PyTorch state_dicts)"
    )
    ap.add_argument("--out", required=True, help="submission .npz to write (atomically, once)")
    ap.add_argument("--no-tta", action="store_true", help="skip the flip test-time augmentation")
    ap.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype of every member (params stay float32)"
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch, rounded up to a multiple of the devices (default: 1 on CPU, 4 "
        "elsewhere)",
    )
    ap.add_argument(
        "--member-chunk",
        type=int,
        help="run at most this many stacked members at once "
        "(default: 1 on CPU, all elsewhere; fewer save memory)",
    )
    add_override_argument(ap)
    ap.add_argument(
        "--val",
        action="store_true",
        help="score against vp_model.npy: print MAPE, write per-sample CSV",
    )
    ap.add_argument("--val-csv", help="per-sample MAPE CSV (default: OUT with .csv)")
    ap.add_argument(
        "--misfit",
        action="store_true",
        help="simulate each prediction's shots and write its data misfit to the per-sample CSV "
        "(fwi_jax.physics; needs a folder of sample folders)",
    )
    ap.add_argument(
        "--calibration",
        help="--misfit: calibration file (default DATA/synth_calibration.json "
        "if it exists, else the uncalibrated cpml8 profile)",
    )
    ap.add_argument(
        "--uncertainty",
        action="store_true",
        help="a confidence map per pixel (OUT_uncertainty.npz, float16 (x, depth)) and a score "
        "per sample (the per-sample CSV): the spread over members x TTA views, and the members' "
        "error heads (model.error_head); with --val, how well they rank the errors "
        "(OUT_uncertainty.json)",
    )
    ap.add_argument(
        "--plot", type=int, default=0, metavar="K", help="save PNG figures of the first K samples"
    )
    ap.add_argument(
        "--plot-dir", help="folder for --plot figures (default: OUT without suffix + '_plots')"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="reader processes (0: reader threads in this process)",
    )
    ap.add_argument(
        "--prefetch", type=int, default=2, help="batches read ahead (and reader threads)"
    )
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="force jax.distributed.initialize() (called automatically when the environment "
        "describes a cluster)",
    )
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # each host reads its share; process 0 writes the file
    initialize_distributed(force=args.distributed)
    tune_cpu_host()  # first: jax.process_index() and friends start the backends
    out = pathlib.Path(args.out).expanduser()
    progress = not args.no_progress and jax.process_index() == 0
    try:
        overrides = list(args.set) + ([f"model.dtype={args.dtype}"] if args.dtype else [])
        apply_overrides(Config(), overrides)  # a misspelt key or value fails before any loading
        if out.suffix != ".npz":
            raise InferenceError(f"--out {out}: the submission must be a .npz file")
        if not out.parent.is_dir():
            raise InferenceError(f"--out {out}: folder {out.parent} does not exist")
        require_writable(out.parent, "--out folder")  # before any compute
        if args.batch is None:
            args.batch = default_batch(jax.devices()[0])
        if args.batch < 1:
            raise InferenceError(f"--batch {args.batch}: must be at least 1")
        specs = (
            read_ensemble_file(args.ensemble)
            if args.ensemble
            else [MemberSpec(c) for c in args.checkpoints]
        )
        root = pathlib.Path(args.data).expanduser()
        try:
            ids = data_io.list_samples(root, args.list)
        except (data_io.DataError, OSError) as e:
            raise InferenceError(str(e)) from None
        members = [load_member(s, args.config, overrides) for s in specs]
        groups = group_members(members)
        if args.uncertainty:
            check_measurable(groups, tta=not args.no_tta)
        check_samples(
            root, ids, need_velocity=args.val, v_range=groups[0].cfg.data.v_range, progress=progress
        )  # before any compute
        forward = None
        if args.misfit:
            if not all((root / i / data_io.SHOT_FILES[0]).is_file() for i in ids):
                raise InferenceError(
                    f"--misfit: {root} must be a folder of sample folders (the raw shot "
                    "files are simulated against), not a packed store"
                )
            forward, what = physics.load_forward(root, args.calibration)
            print(f"--misfit: {what}")
    except (InferenceError, MemberError, StorageError, ConfigError, physics.PhysicsError) as e:
        return fail(e)
    predictor = Predictor(
        groups, tta=not args.no_tta, member_chunk=args.member_chunk, uncertainty=args.uncertainty
    )
    batch = -(-args.batch // predictor.n_devices) * predictor.n_devices
    if batch != args.batch:
        print(
            f"--batch {args.batch} rounded up to {batch}, a multiple of the {predictor.n_devices} "
            "devices"
        )
    desc = ", ".join(f"{len(g.sources)} x {g.cfg.name}" for g in groups)
    print(
        f"{len(ids)} samples, ensemble {desc}, TTA {'off' if args.no_tta else 'on'}, "
        f"{predictor.n_devices} {jax.devices()[0].platform} device(s), global batch {batch}"
    )
    try:
        result = predict_samples(
            predictor,
            root,
            ids,
            batch,
            val=args.val,
            keep=args.plot,
            workers=args.workers,
            prefetch=args.prefetch,
            progress=progress,
        )
    except (InferenceError, ValueError, OSError) as e:  # a sample that broke while reading
        return fail(f"{e}\nno submission written")
    print(
        f"{len(result.predictions)} samples in {result.seconds:.1f} s "
        f"({len(result.predictions) / max(result.seconds, 1e-9):.2f} samples/s, first compile "
        "included)"
    )
    n_steady, t_steady = result.steady
    if n_steady:
        print(
            f"after the first batch: {n_steady} samples in {t_steady:.1f} s "
            f"({n_steady / max(t_steady, 1e-9):.3f} samples/s, compile excluded)"
        )
    if jax.process_index() == 0:
        data_io.write_submission(out, result.predictions)
        print(f"wrote {out} ({len(result.predictions)} predictions, float64 (x, depth))")
        csv = pathlib.Path(args.val_csv).expanduser() if args.val_csv else out.with_suffix(".csv")
        rows = {i: {} for i in result.predictions}
        if args.val:
            for i, m in result.mape.items():
                rows[i]["mape"] = float(m)
            print(
                f"validation MAPE {np.mean(list(result.mape.values())):.6f} over "
                f"{len(result.mape)} samples "
                f"(per sample: {csv})"
            )
        if forward is not None:
            try:
                scores = physics.score_submission(
                    root, result.predictions, forward, progress=progress
                )
            except (physics.PhysicsError, data_io.DataError) as e:
                return fail(f"--misfit: {e}")
            for i, r in scores.items():
                rows[i]["misfit"] = r["misfit"]
            print(
                f"data misfit {np.mean([r['misfit'] for r in scores.values()]):.5f} (mean "
                "relative L2, "
                f"per sample: {csv})"
            )
        if args.uncertainty:
            report_uncertainty(out, csv, groups, not args.no_tta, result, rows)
        if args.val or forward is not None or args.uncertainty:
            physics.write_csv(csv, rows)
        if args.plot:
            from fwi_jax import plots

            plot_dir = plots.plot_folder(args.plot_dir, out)
            for sid, item in result.kept.items():
                plots.plot_sample(
                    plot_dir / f"{sid}.png",
                    sid,
                    item["x"],
                    item["pred"],
                    item["v"],
                    confidence=item.get("confidence"),
                )
            print(f"wrote {len(result.kept)} figures to {plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
