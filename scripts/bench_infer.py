"""Inference throughput: our stacked ensemble vs the reference's way, in one run.

- ours: ``fwi_jax.ensemble.Predictor`` with its platform defaults, as ``python -m fwi_jax.infer``
runs —
  N members of one config stacked (vmapped on accelerators, one at a time on CPU), flip TTA in the
  same batch (accelerators) or as a second pass (CPU), the weighted mean on device, one jitted
  program, batches sharded over devices;
  one row per attention implementation (``--attention``; remat does not apply: no backward pass);
- the reference's way: the PyTorch model (tests/torch_reference.py, timm Eva; for the first
  place's configs their module, tests/torch_firstplace.py), one member after
  another, batch 1, TTA as a second forward pass, the mean on the host.

Both run the same random weights (the PyTorch state_dicts converted by ``fwi_jax.convert``); the
script prints the largest difference between the two ensembles as a check. Inputs are random
(6, 10000, 31) arrays in memory, so the figures are compute only (no file reading). Each of our
rows also gives XLA's FLOPs per batch (``cost_analysis``; a ``lax.scan``/``lax.map`` body is
counted once, so blockwise and query_blocks attention and a chunked member loop are
undercounted), the achieved model FLOP/s (from the ``xla`` row's count times the member-loop
trips, when an ``xla`` row is run), its share of this machine's dense float32 matmul FLOP/s
measured in the same run (the practical roofline), and XLA's memory estimate of the program.

    python scripts/bench_infer.py [--config tiny_s8] [--members 3] [--batch 1] [--samples 2]
        [--torch-samples 1] [--dtype float32] [--attention auto xla] [--no-tta] [--set ...]

``--forward-flops``: compile only; XLA's forward FLOPs per sample at batch 1 and 8 with
``model.constant_channel_once`` off and on (``xla`` attention: nothing hidden in a custom call).

``--through-infer``: end to end instead. The script writes ``--samples`` + 1 samples as shot
files (as the competition ships them) and the members as reference state_dicts (.pth), runs
``python -m fwi_jax.infer`` on them in a subprocess and takes its rate after the first batch (the
start-up, the member loading and the compile excluded; reading the files included); then
PyTorch runs the same samples, read the same way, member by member with the same TTA (the first
sample untimed), in this process. The ratio of the two is the figure.

Inputs are as preprocessing makes them (`fwi_jax.preprocess.shots_to_input`: channel 151 zeros).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from bench_common import (
    REPO,
    compiled_flops,
    compiled_memory_gib,
    cpu_peak,
    fmt,
    forward_flops,
    matmul_roofline,
)

from fwi_jax import ensemble, infer
from fwi_jax import members as members_lib
from fwi_jax.config import add_override_argument, load_config
from fwi_jax.convert import convert_state_dict
from fwi_jax.host import tune_cpu_host
from fwi_jax.model import onednn
from fwi_jax.model.attention import resolve_impl
from fwi_jax.model.fwi import model_size
from fwi_jax.preprocess import SOURCE_POSITIONS, shots_to_input


def bench_ours(cfg, state_dicts, xs, tta: bool, member_chunk: int | None) -> dict:
    """Compile the ensemble program, run xs[0] as warm-up, time the rest (one batch in flight)."""
    members = [
        members_lib.Member(
            cfg=cfg, params=convert_state_dict(sd, cfg)[0], weight=1.0, source=f"seed {s}"
        )
        for s, sd in enumerate(state_dicts)
    ]
    predictor = ensemble.Predictor(
        ensemble.group_members(members), tta=tta, member_chunk=member_chunk
    )
    t0 = time.perf_counter()
    rec = {"first": predictor(xs[0])}  # compile + warm-up
    rec["compile_s"] = time.perf_counter() - t0  # compile + first batch
    t0 = time.perf_counter()
    pending = None
    for x in xs[1:]:  # one batch in flight, as fwi_jax.infer runs
        y = predictor.dispatch(x)
        if pending is not None:
            predictor.fetch(pending)
        pending = y
    predictor.fetch(pending)
    rec["batch_s"] = (time.perf_counter() - t0) / (len(xs) - 1)
    rec["samples_per_s"] = len(xs[0]) / rec["batch_s"]
    # XLA's analyses need a Compiled object, and jit's cached executable is not one: this compiles
    # the program a second time, after the timing
    compiled = predictor.lower(xs[0]).compile()
    rec.update(flops=compiled_flops(compiled), mem_gib=compiled_memory_gib(compiled))
    return rec


def print_forward_flops(args) -> int:
    """Print XLA's forward GFLOP per sample, switch off and on, batch 1 and 8 (compile only)."""
    import jax.numpy as jnp

    from fwi_jax.model import abstract_model, apply_model

    print(f"{args.config}: forward GFLOP per sample (XLA cost analysis, xla attention)")
    for batch in (1, 8):
        for on in (False, True):
            cfg = load_config(
                args.config,
                [
                    *args.set,
                    f"model.dtype={args.dtype}",
                    "model.attention=xla",
                    f"model.constant_channel_once={on}",
                ],
            )
            graphdef, params = abstract_model(cfg)
            g = cfg.geometry
            x = jax.ShapeDtypeStruct((batch, 6, g.n_time, g.n_receivers), jnp.float32)
            fn = jax.jit(lambda p, x, gd=graphdef: apply_model(gd, p, x))
            flops = compiled_flops(fn.lower(params, x).compile())
            print(
                f"batch {batch}, constant_channel_once {on}: {flops / batch / 1e9:.2f}", flush=True
            )
    return 0


def torch_ensemble(
    refs, cfg, x_np: np.ndarray, *, tta: bool, dtype: str, device: str = "cpu"
) -> np.ndarray:
    """The PyTorch members' mean prediction (depth, x) km/s for one input ``x_np`` (6, T, R):
    one model after another at batch 1, under autocast for a bfloat16/float16 ``dtype``, on
    ``device`` (where ``refs`` are)."""
    import torch
    from torch_firstplace import flip_dims

    autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    x = torch.from_numpy(x_np[None]).to(device)
    outs = []
    with (
        torch.inference_mode(),
        torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None),
    ):
        for ref in refs:
            y = ref(x).float()
            if tta:
                y = 0.5 * (y + ref(x.flip(flip_dims(cfg))).float().flip(2))
            outs.append(y[0].cpu().numpy())
    return np.mean(outs, axis=0)


def through_infer(
    args, cfg, refs, tta: bool, device: str = "cpu", torch_samples: int | None = None
) -> dict:
    """``python -m fwi_jax.infer`` on shot files against PyTorch member by member (see above;
    PyTorch on ``device``, where ``refs`` are, timed on ``torch_samples`` of the samples, default
    all): {"ours", "torch" (samples/s), "diff" (km/s),
    "infer_wall_s"}, or {"error": the run's output} when infer fails."""
    import subprocess
    import tempfile

    import torch

    from fwi_jax.data.io import read_sample

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rng = np.random.default_rng(0)
        ids = [f"s{i:03d}" for i in range(args.samples + 1)]
        for sid in ids:
            (tmp / "data" / sid).mkdir(parents=True)
            for pos in SOURCE_POSITIONS:
                shot = (1e-4 * rng.standard_normal((10001, 31))).astype(np.float32)
                np.save(tmp / "data" / sid / f"receiver_data_src_{pos}.npy", shot)
        paths = []
        for i, ref in enumerate(refs):
            paths.append(tmp / f"member{i}.pth")
            torch.save(getattr(ref, "model", ref).state_dict(), paths[-1])  # see main()
        # the config with --set applied, as a JSON file: infer converts state_dicts for --config
        (tmp / "config.json").write_text(cfg.to_json())
        cmd = [
            sys.executable,
            "-m",
            "fwi_jax.infer",
            "--data",
            str(tmp / "data"),
            "--config",
            str(tmp / "config.json"),
            "--checkpoints",
            *map(str, paths),
            "--out",
            str(tmp / "sub.npz"),
            "--dtype",
            args.dtype,
            *(["--batch", str(args.batch)] if args.batch else []),
            *(["--no-tta"] if not tta else []),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            cwd=REPO,
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"python -m fwi_jax.infer exit {proc.returncode}: " + " | ".join(tail)}
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("after the first batch"))
        ours = float(line.split("(")[1].split(" samples/s")[0])
        print(f"python -m fwi_jax.infer ({wall:.1f} s in all): {line}", flush=True)
        with np.load(tmp / "sub.npz") as sub:
            got = {sid: sub[sid].T for sid in ids}

        def reference(x_np):  # the PyTorch ensemble on one input
            return torch_ensemble(refs, cfg, x_np, tta=tta, dtype=args.dtype, device=device)

        resample = cfg.geometry.time_resample  # as infer reads the files (the first place: area)

        first = read_sample(tmp / "data" / ids[0], time_resample=resample)[0]
        diff = float(np.abs(reference(first) - got[ids[0]]).max())
        n_torch = min(args.samples, torch_samples or args.samples)
        t0 = time.perf_counter()
        for sid in ids[1 : 1 + n_torch]:
            reference(read_sample(tmp / "data" / sid, time_resample=resample)[0])
        theirs = n_torch / (time.perf_counter() - t0)
    print(
        f"PyTorch, member by member, batch 1, {n_torch} of the same samples from the same files: "
        f"{theirs:.3f} samples/s; max |ours - reference| on the first sample = {diff:.2e} km/s"
    )
    print(
        f"\n| path | samples/s | vs reference |\n|---|---:|---:|\n"
        f"| python -m fwi_jax.infer, {args.members} members, TTA {'on' if tta else 'off'}, "
        f"{args.dtype} | {ours:.3f} | {ours / theirs:.2f}x |\n"
        f"| PyTorch, member by member, batch 1 | {theirs:.3f} | 1.00x |"
    )
    print(f"load average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return {"ours": ours, "torch": theirs, "diff": diff, "infer_wall_s": wall}


def summarise(args, cfg, tta: bool, runs: list[dict]) -> None:
    """Medians over the runs, and our rate as model FLOP/s and a share of the CPU's peak."""
    ours = statistics.median(r["ours"] for r in runs)
    theirs = statistics.median(r["torch"] for r in runs)
    flops = forward_flops(cfg) * (2 if tta else 1) * args.members  # per sample
    peak, how = cpu_peak(args.dtype)
    print(
        f"\nmedian of {len(runs)} runs: ours {ours:.3f} samples/s, PyTorch {theirs:.3f}: "
        f"{ours / theirs:.2f}x (per run: "
        + ", ".join(f"{r['ours'] / r['torch']:.2f}x" for r in runs)
        + f"); model {flops / 1e9:.0f} GFLOP per sample: ours {ours * flops / 1e9:.0f} GFLOP/s = "
        f"{100 * ours * flops / peak:.1f} % of the {args.dtype} peak {peak / 1e9:.0f} GFLOP/s "
        f"({how}); PyTorch {100 * theirs * flops / peak:.1f} %"
    )


def in_memory(args, cfg, refs, tta: bool) -> dict:
    """Ours (the ``--attention`` rows) and PyTorch on the same arrays in memory; prints the table
    and returns {"ours": the first row's samples/s, "torch": PyTorch's (0 when skipped)}."""
    import torch

    state_dicts = [
        {k: v.detach().numpy() for k, v in getattr(ref, "model", ref).state_dict().items()}
        for ref in refs
    ]  # the first place's module sits inside its input adapter
    n_devices = jax.device_count()
    batch = args.batch or infer.default_batch(jax.devices()[0])
    batch = -(-batch // n_devices) * n_devices
    g = cfg.geometry
    rng = np.random.default_rng(0)
    n_batches = max(1, -(-args.samples // batch))
    xs = [
        shots_to_input(
            1e-4 * rng.standard_normal((batch, 5, g.n_time + 1, g.n_receivers)).astype(np.float32)
        )
        for _ in range(n_batches + 1)
    ]

    platform = jax.devices()[0].platform
    print(
        f"config {cfg.name} ({args.dtype}), {args.members} members, TTA {'on' if tta else 'off'}; "
        f"{n_devices} {platform} device(s), {torch.get_num_threads()} torch threads",
        flush=True,
    )
    roof = matmul_roofline() if platform == "cpu" else None
    if roof:
        print(
            f"dense float32 matmul 2048^3 under XLA: {roof / 1e9:.1f} GFLOP/s (the practical "
            "roofline)",
            flush=True,
        )

    chunk = args.member_chunk or ensemble.default_member_chunk(jax.devices()[0])
    how = (
        "stacked vmap"
        if not chunk or chunk >= args.members
        else f"stacked, lax.map in chunks of {chunk}"
    )
    how += (
        ", TTA in the batch"
        if ensemble.default_tta_in_batch(jax.devices()[0])
        else ", TTA as a second pass"
    )
    rows = []
    for attention in args.attention:
        row_cfg = load_config(
            args.config, [*args.set, f"model.dtype={args.dtype}", f"model.attention={attention}"]
        )
        rec = bench_ours(row_cfg, state_dicts, xs, tta, args.member_chunk)
        size = model_size(row_cfg)
        impl = resolve_impl(attention, None, size.dim // size.heads, args.dtype)
        dense = onednn.resolve(row_cfg.model.dense, None, args.dtype)
        rec["name"] = f"ours {attention} ({impl}, dense {dense}): {how}, one jit"
        rec["batch"] = batch
        rows.append(rec)
        print(
            f"{rec['name']}: compile + first batch {rec['compile_s']:.1f} s, {rec['batch_s']:.1f} "
            f"s per batch of {batch} "
            f"= {rec['samples_per_s']:.3f} samples/s",
            flush=True,
        )

    if args.torch_samples > 0:

        def reference_ensemble(x_np):  # the PyTorch ensemble on one input
            return torch_ensemble(refs, cfg, x_np, tta=tta, dtype=args.dtype)

        check = reference_ensemble(xs[0][0])
        diff = max(float(np.abs(check - r["first"][0]).max()) for r in rows)
        t0 = time.perf_counter()
        for i in range(args.torch_samples):
            reference_ensemble(xs[1 + i // batch % n_batches][i % batch])
        t_ref = time.perf_counter() - t0
        theirs = args.torch_samples / t_ref
        print(
            f"reference way (PyTorch, member by member, batch 1): {args.torch_samples} samples in "
            f"{t_ref:.1f} s "
            f"= {theirs:.3f} samples/s; max |ours - reference| = {diff:.2e} km/s",
            flush=True,
        )
        rows.append(
            {
                "name": "reference: PyTorch, member by member, batch 1",
                "batch": 1,
                "samples_per_s": theirs,
            }
        )

    ref_sps = rows[-1]["samples_per_s"] if args.torch_samples > 0 else None
    # XLA counts a loop body once: the attention loops of blockwise/query_blocks, and the member
    # loop when members run in chunks. The xla row has no attention loop: its count times the
    # member-loop trips is the ensemble's FLOPs per batch, the base of "model GFLOP/s".
    trips = -(-args.members // chunk) if chunk and chunk < args.members else 1
    model_flops = next(
        (r["flops"] * trips for r in rows if r.get("flops") and r["name"].startswith("ours xla ")),
        None,
    )
    if model_flops:
        print(
            f"\nensemble FLOPs per batch (xla row's count x {trips} member-loop trips): "
            f"{model_flops / 1e9:.0f} GFLOP"
        )
    print(
        "\n| path | batch | samples/s | XLA GFLOP/batch (loop bodies once) | model GFLOP/s | % of "
        "matmul roofline "
        "| XLA memory GiB | vs reference |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for r in rows:
        fps = model_flops / r["batch_s"] if model_flops and "batch_s" in r else None
        print(
            f"| {r['name']} | {r['batch']} | {r['samples_per_s']:.3f} | "
            f"{fmt(r.get('flops') and r['flops'] / 1e9, '.0f')} "
            f"| {fmt(fps and fps / 1e9, '.1f')} | {fmt(fps and roof and 100 * fps / roof, '.0f')} "
            f"| {fmt(r.get('mem_gib'), '.2f')} | "
            f"{fmt(ref_sps and r['samples_per_s'] / ref_sps, '.2f', 'n/a')}x |"
        )
    if roof:
        print(f"\nmatmul roofline: {roof / 1e9:.1f} GFLOP/s (jitted float32 2048x2048 matmul)")
    return {"ours": rows[0]["samples_per_s"], "torch": ref_sps or 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_s8")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument(
        "--batch", type=int, default=None, help="global batch of ours (default: infer's, 1 on CPU)"
    )
    ap.add_argument(
        "--samples", type=int, default=2, help="samples timed for ours (after one warm-up batch)"
    )
    ap.add_argument(
        "--torch-samples",
        type=int,
        default=1,
        help="samples timed for the PyTorch reference (0: skip)",
    )
    ap.add_argument("--dtype", default="float32", choices=infer.DTYPES)
    ap.add_argument(
        "--attention", nargs="+", default=["auto"], help="our rows: model.attention of each"
    )
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--member-chunk", type=int)
    ap.add_argument(
        "--forward-flops",
        action="store_true",
        help="compile only: forward FLOPs per sample, constant_channel_once off and on",
    )
    ap.add_argument(
        "--through-infer",
        action="store_true",
        help="end to end: python -m fwi_jax.infer on shot files vs PyTorch on the same files",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of the whole comparison (ours, then PyTorch); medians printed at the end",
    )
    add_override_argument(ap)
    args = ap.parse_args(argv)
    if args.forward_flops:
        return print_forward_flops(args)
    # ours runs as `python -m fwi_jax.infer` does (FWI_JAX_CPU_TUNING=0: XLA's defaults)
    tune_cpu_host()
    from torch_firstplace import torch_model

    tta = not args.no_tta
    cfg = load_config(args.config, [*args.set, f"model.dtype={args.dtype}"])
    refs = [torch_model(cfg, seed=s).eval() for s in range(args.members)]
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    if args.through_infer:
        runs = []
        for i in range(args.repeats):
            print(f"\n== run {i + 1} of {args.repeats}", flush=True)
            rec = through_infer(args, cfg, refs, tta)
            if "error" in rec:
                return 1
            runs.append(rec)
        summarise(args, cfg, tta, runs)
        return 0
    runs = []
    for i in range(args.repeats):
        if args.repeats > 1:
            print(f"\n== run {i + 1} of {args.repeats}", flush=True)
        runs.append(in_memory(args, cfg, refs, tta))
    if args.torch_samples > 0:
        summarise(args, cfg, tta, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
