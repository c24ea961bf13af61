"""One command that measures fwi-jax against the PyTorch reference on this machine's GPU.

    python scripts/gpu_bench.py            # every section (about 15 min on one H100: a guess)
    python scripts/gpu_bench.py --quick    # the sections that matter most, under 8 min
    python scripts/gpu_bench.py --smoke    # every section with tiny shapes on the CPU (a test)

Sections, all in one run on one device (docs/gpu.md says what each column means):

1. env: the GPU (name, compute capability, memory, driver), the versions of jax, jaxlib, flax,
   torch and timm, and the dense matmul rate of this device measured now, in the training's
   16-bit type and in float32, under JAX and under PyTorch (the roofline of the MFU figures).
2. parity: tiny_s8 and base_s6 forward passes with the same random weights (a PyTorch reference
   model's state_dict converted by ``fwi_jax.convert``): ours in float32 and in the 16-bit type
   against PyTorch float32 on the same device, max |difference| in km/s.
3. train: base_s6 and tiny_s8 at the reference's batch (8) in bfloat16 (float16 with loss
   scaling on a GPU of compute capability < 8.0): our real step (``fwi_jax.train``: loss,
   backward, AdamW, EMA) against the reference's PyTorch step (AdamW, autocast, GradScaler for
   float16) eager and under ``torch.compile``: samples/s, peak device memory, ours / PyTorch,
   MFU (model FLOPs per step / step time / the measured 16-bit matmul rate), the attention and
   remat our run chose (remat: the first of none, dots, full whose XLA memory estimate fits).
4. infer: a 3-member base_s6 ensemble with flip TTA through ``python -m fwi_jax.infer`` on shot
   files against PyTorch member by member on the same files (scripts/bench_infer.py
   --through-infer); without grain, our ``fwi_jax.ensemble.Predictor`` (infer's compute) instead.
5. synth: samples/s of ``fwi_jax.synth``'s two generator profiles, ``devito`` and ``cpml8``
   (this package's JAX solvers; the devito package is not used).
6. projection: the reference's 22 training runs (10 base_s6, 6 base_s8, 6 tiny_s8; steps per run
   from configs/) in hours on this device, ours against PyTorch, beside the reference's
   110 V100-hours. A config whose step was not measured is scaled from base_s6 by model FLOPs.

Each job runs in its own process (``--smoke``: in this one), so memory is returned between jobs
and a failure stays in its row. Nothing is downloaded: random weights, random inputs. What is
missing (torch, timm, grain, a GPU) is said in one line and the columns it feeds say "n/a".
Writes ``--json`` (default gpu_bench.json) and prints a Markdown table per section.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

from bench_common import GIB, compiled_memory_gib, fmt, make_batch, our_train_step

SECTIONS = ("env", "parity", "train", "infer", "synth", "projection")
QUICK_LIMIT_S = 450  # --quick stops starting jobs after this, and ends a job that runs past it
BATCH = 8  # the reference's global batch
REFERENCE_TRAIN_SAMPLES = 4599  # the reference's training split (docs/reference.md)
# the reference's 22 runs (docs/reference.md §5) and their cost on one V100-32GB
REFERENCE_RUNS = {"base_s6": 10, "base_s8": 6, "tiny_s8": 6}
REFERENCE_V100_HOURS = 110.0
REMATS = ("none", "dots", "full")  # tried in this order; the first that fits is run
# --smoke: every section's code on tiny shapes (the reduced geometry of tests/test_model.py and a
# 2-block network of width 32)
SMOKE_SET = [
    "geometry.n_time=200",
    "geometry.fold=10",
    "geometry.resize=(56,42)",
    "geometry.head_patch=(14,14)",
    "geometry.out_shape=(50,30)",
    "geometry.crop_offset=(0,4)",
    "model.depth=2",
    "model.split=1",
    "model.dim=32",
    "model.heads=2",
]
# --smoke's inference: full-size shot files (infer reads the competition format), the demo's
# smaller token grid with a square head as the PyTorch reference needs, the same small network
SMOKE_INFER = [
    "model.depth=2",
    "model.split=1",
    "model.dim=32",
    "model.heads=2",
    "geometry.time_power=0",
    "model.depth_prior=false",
    "geometry.head_patch=(56,56)",
]
# rough guesses of each job's seconds on one H100 including its process start and compiles
# (no GPU has run this script yet: the first run's printed wall times replace them)
GUESS_S = {
    "env": 20,
    "parity": 40,
    "train_ours": 70,
    "train_torch": 30,
    "train_torch_compile": 110,
    "infer": 90,
    "synth": 60,
    "flops": 15,
}


# ---------------------------------------------------------------------------------------------
# Jobs: each returns a JSON-able dict (an "error" key when it failed), run in a child process


def _missing_torch() -> str | None:
    """One line saying what the PyTorch columns lack, or None when torch and timm import."""
    gone = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(gone)} not installed (pip install torch timm)" if gone else None


def _torch_device(o) -> str:
    import torch

    return "cuda" if not o["smoke"] and torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _set(o, *extra: str) -> list[str]:
    return [*(SMOKE_SET if o["smoke"] else []), *extra]


def _device_memory() -> tuple[float | None, float | None]:
    """(peak bytes in use, bytes limit) of JAX's first device, GiB; None where not reported."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak, limit = stats.get("peak_bytes_in_use"), stats.get("bytes_limit")
    return (peak and peak / GIB), (limit and limit / GIB)


def job_env(o) -> dict:
    import jax
    from bench_common import matmul_roofline

    dev = jax.devices()[0]
    rec = {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "compute_capability": getattr(dev, "compute_capability", None),
        "versions": {},
    }
    for name in ("jax", "jaxlib", "flax", "torch", "timm", "grain"):
        try:
            rec["versions"][name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is a fact to report
            rec["versions"][name] = None
    cc = rec["compute_capability"]
    # bfloat16 where the GPU has it (compute capability >= 8.0) and on CPUs; float16 on older GPUs
    rec["dtype16"] = "float16" if cc is not None and float(cc) < 8.0 else "bfloat16"
    rec["memory_gib"] = _device_memory()[1]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        rec["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError):
        rec["driver"] = None
    n = 256 if o["smoke"] else 8192
    rec["matmul_n"] = n
    rec["jax_tflops"] = {
        dt: matmul_roofline(n, 10, dt) / 1e12 for dt in (rec["dtype16"], "float32")
    }
    if (why := _missing_torch()) is None:
        import torch

        device = _torch_device(o)
        rec["torch_device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        rec["torch_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        rec["torch_tflops"] = {}
        for dt in (rec["dtype16"], "float32"):
            a = torch.randn(n, n, device=device).to(getattr(torch, dt))
            b = torch.randn(n, n, device=device).to(getattr(torch, dt))
            times = []
            for i in range(11):
                _sync(device)
                t0 = time.perf_counter()
                a @ b
                _sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
            rec["torch_tflops"][dt] = 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
    else:
        rec["torch_missing"] = why
    return rec


def job_parity(o, config: str, dtype16: str) -> dict:
    import jax
    import numpy as np
    import torch
    from torch_firstplace import torch_model

    from fwi_jax.config import load_config
    from fwi_jax.convert import convert_state_dict
    from fwi_jax.model import abstract_model, apply_model

    device = _torch_device(o)
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in true float32
    torch.backends.cudnn.allow_tf32 = False
    cfg32 = load_config(config, _set(o, "model.dtype=float32"))
    ref = torch_model(cfg32, seed=0).eval().to(device)
    sd = {k: v.detach().cpu().numpy() for k, v in getattr(ref, "model", ref).state_dict().items()}
    params, _ = convert_state_dict(sd, cfg32)
    x, _ = make_batch(cfg32, 2)
    xt = torch.from_numpy(x).to(device)
    with torch.inference_mode():
        want = ref(xt).float().cpu().numpy()
        with torch.autocast(device, dtype=getattr(torch, dtype16)):
            torch16 = ref(xt).float().cpu().numpy()
    rec = {"config": config, "torch_device": device, f"torch_{dtype16}": _maxdiff(torch16, want)}
    for name, dtype, precision in (
        ("float32", "float32", None),
        ("float32 highest", "float32", "highest"),
        (dtype16, dtype16, None),
    ):
        cfg = load_config(config, _set(o, f"model.dtype={dtype}"))
        graphdef, _ = abstract_model(cfg)
        fn = jax.jit(lambda p, x, gd=graphdef: apply_model(gd, p, x))
        with jax.default_matmul_precision(precision):
            got = np.asarray(fn(params, x))
        rec[name] = _maxdiff(got, want)
    return rec


def _maxdiff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def job_train_ours(o, config: str, dtype16: str) -> dict:
    import jax
    from bench_common import train_step_flops

    from fwi_jax.config import load_config
    from fwi_jax.model.attention import resolve_impl

    batch, steps = (2, 2) if o["smoke"] else (BATCH, 10)
    rec = {"config": config, "dtype": dtype16, "batch": batch, "tried": []}
    cfg = load_config(config, _set(o, f"model.dtype={dtype16}"))
    rec["attention"] = resolve_impl(cfg.model.attention, dtype=cfg.model.dtype)
    _, limit = _device_memory()
    chosen, mem = None, None
    t0 = time.perf_counter()
    for remat in REMATS:
        cfg = cfg.replace(**{"model.remat": remat})
        step, state, data, rec["params"] = our_train_step(cfg, batch)
        compiled = jax.jit(step, donate_argnums=0).lower(state, data).compile()
        mem = compiled_memory_gib(compiled)
        rec["tried"].append({"remat": remat, "xla_memory_gib": mem})
        # room for what XLA's estimate leaves out (cuDNN workspaces, the allocator's slack)
        if mem is None or limit is None or mem < 0.9 * limit:
            rec["remat"], rec["xla_memory_gib"] = remat, mem
            chosen = compiled, state, data
            break
        del step, state, data, compiled  # before the next try allocates its own
    if chosen is None:
        rec["error"] = f"no remat fits: XLA estimate {mem:.1f} GiB of {limit:.1f} GiB"
        return rec
    compiled, state, data = chosen
    del chosen
    rec["compile_s"] = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):  # dispatched back to back, as training runs
        state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    rec["step_s"] = (time.perf_counter() - t0) / steps
    rec["samples_per_s"] = batch / rec["step_s"]
    rec["loss"] = float(metrics["loss"])
    rec["peak_gib"], _ = _device_memory()
    rec["model_flops"] = train_step_flops(cfg, batch)
    return rec


def job_train_torch(o, config: str, dtype16: str, compiled: bool) -> dict:
    import torch
    from bench_common import torch_loss
    from torch_firstplace import torch_model

    from fwi_jax.config import load_config

    batch, steps = (2, 2) if o["smoke"] else (BATCH, 10)
    device = _torch_device(o)
    cfg = load_config(config, _set(o, f"model.dtype={dtype16}"))
    torch.manual_seed(0)
    model = torch_model(cfg, seed=0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    half = getattr(torch, dtype16)
    scaler = torch.amp.GradScaler(device, enabled=dtype16 == "float16")
    # --smoke: dynamo's graph capture without inductor's C++ build (minutes on a CPU)
    forward = (
        torch.compile(model, backend="eager" if o["smoke"] else "inductor") if compiled else model
    )
    loss_fn = torch_loss(cfg)
    x_np, v_np = make_batch(cfg, batch)
    x, v = torch.from_numpy(x_np).to(device), torch.from_numpy(v_np).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=half):
            pred = forward(x)
        loss = loss_fn(pred, v)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()  # torch.compile compiles here
    _sync(device)
    rec = {"config": config, "dtype": dtype16, "batch": batch, "compiled": compiled}
    rec["compile_s"] = time.perf_counter() - t0
    step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    rec["step_s"] = (time.perf_counter() - t0) / steps
    rec["samples_per_s"] = batch / rec["step_s"]
    rec["loss"] = float(loss.detach())
    rec["peak_gib"] = torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None
    return rec


def job_infer(o, dtype16: str) -> dict:
    import numpy as np
    from bench_infer import bench_ours, through_infer, torch_ensemble
    from torch_firstplace import torch_model

    from fwi_jax.config import load_config

    device = _torch_device(o)
    members, samples, torch_samples = (3, 2, 1) if o["smoke"] else (3, 32, 8)
    dtype = "float32" if o["smoke"] else dtype16
    config = "demo" if o["smoke"] else "base_s6"
    cfg = load_config(config, [*(SMOKE_INFER if o["smoke"] else []), f"model.dtype={dtype}"])
    refs = [torch_model(cfg, seed=s).eval().to(device) for s in range(members)]
    rec = {"config": config, "members": members, "tta": True, "dtype": dtype}
    if importlib.util.find_spec("grain") is not None:
        args = argparse.Namespace(samples=samples, members=members, dtype=dtype, batch=None)
        rec["path"] = "python -m fwi_jax.infer"
        rec.update(through_infer(args, cfg, refs, True, device, torch_samples))
        return rec
    # no grain (infer's reader): infer's compute, the ensemble program, on arrays in memory
    import jax

    from fwi_jax import infer
    from fwi_jax.preprocess import shots_to_input

    rec["path"] = "fwi_jax.ensemble.Predictor (grain not installed: no file reading)"
    batch = infer.default_batch(jax.devices()[0])
    g = cfg.geometry
    rng = np.random.default_rng(0)
    xs = [
        shots_to_input(
            1e-4 * rng.standard_normal((batch, 5, g.n_time + 1, g.n_receivers)).astype(np.float32)
        )
        for _ in range(max(2, samples // batch + 1))
    ]
    sds = [
        {k: v.detach().cpu().numpy() for k, v in getattr(r, "model", r).state_dict().items()}
        for r in refs
    ]
    ours = bench_ours(cfg, sds, xs, True, None)
    rec["ours"] = ours["samples_per_s"]
    got = ours["first"][0]
    want = torch_ensemble(refs, cfg, xs[0][0], tta=True, dtype=dtype, device=device)
    rec["diff"] = _maxdiff(got, want)
    t0 = time.perf_counter()
    for i in range(torch_samples):
        torch_ensemble(refs, cfg, xs[1][i % batch], tta=True, dtype=dtype, device=device)
    rec["torch"] = torch_samples / (time.perf_counter() - t0)
    return rec


def job_synth(o, profile: str) -> dict:
    import jax
    import numpy as np

    from fwi_jax import synth
    from fwi_jax.synth import profiles as P
    from fwi_jax.synth import wave as W

    if o["smoke"]:  # a 100 m x 60 m model, 2 shots, 8 receivers, 60 ms
        z = np.arange(60)
        v = np.broadcast_to(1.8 + 1.2 * (z >= 30), (2, 100, 60)).astype(np.float32)
        kw = {
            "survey": W.Survey(source_x=(10.0, 60.0), receiver_x=tuple(10.0 * k for k in range(8))),
            "out_nt": 60,
            "t_end_ms": 60.0,
        }
    else:  # the competition's geometry: 5 shots, 31 receivers, 10,001 samples per trace
        n = 2 * jax.device_count() if jax.devices()[0].platform == "cpu" else 8
        v = np.stack([synth.sample_model(0, i)[1] for i in range(n)])
        kw = {}
    if profile == "devito":  # one top speed: one time step, one compiled solver
        v = v * (4.1 / v.max(axis=(1, 2), keepdims=True))
    t0 = time.perf_counter()
    P.simulate(v, profile=profile, **kw)  # compile + first run
    rec = {"profile": profile, "samples": len(v), "first_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    out = P.simulate(v, profile=profile, **kw)
    rec["samples_per_s"] = len(v) / (time.perf_counter() - t0)
    rec["shape"] = list(out.shape[1:])
    return rec


def job_flops(o, config: str, dtype16: str) -> dict:
    from bench_common import train_step_flops

    from fwi_jax.config import load_config

    cfg = load_config(config, _set(o, f"model.dtype={dtype16}"))
    return {"config": config, "model_flops": train_step_flops(cfg, 2 if o["smoke"] else BATCH)}


JOBS = {
    "env": job_env,
    "parity": job_parity,
    "train_ours": job_train_ours,
    "train_torch": lambda o, c, d: job_train_torch(o, c, d, False),
    "train_torch_compile": lambda o, c, d: job_train_torch(o, c, d, True),
    "infer": job_infer,
    "synth": job_synth,
    "flops": job_flops,
}


def run_job(o, name: str, *args) -> dict:
    """Run job ``name`` in a child process (in this one with --smoke); its record, with "wall_s".
    A crash, a missing package or the time limit becomes {"error": one line}."""
    t0 = time.perf_counter()
    left = o["deadline"] - time.time() if o["deadline"] else None
    if left is not None and left < 5:
        return {"error": "skipped: --quick time limit reached", "wall_s": 0.0}
    if o["smoke"]:
        try:
            rec = JOBS[name](o, *args)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    else:
        cmd = [sys.executable, __file__, "--job", json.dumps([name, o, list(args)])]
        env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # JAX beside PyTorch
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=left)
            line = next((s for s in p.stdout.splitlines()[::-1] if s.startswith("RESULT ")), None)
            if line:
                rec = json.loads(line[len("RESULT ") :])
            else:
                tail = (p.stderr or p.stdout).strip().splitlines()[-2:]
                rec = {"error": f"exit {p.returncode}: " + " | ".join(tail)[-300:]}
        except subprocess.TimeoutExpired:
            rec = {"error": "stopped: --quick time limit reached"}
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def child_main(spec: str) -> int:
    name, o, args = json.loads(spec)
    try:
        rec = JOBS[name](o, *args)
    except Exception as e:  # noqa: BLE001 - reported in the table
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        rec = {"error": f"{type(e).__name__}: {msg}"}
    print("RESULT " + json.dumps(rec), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Tables


def _err(rec: dict) -> str | None:
    return rec.get("error")


def table_env(env: dict) -> str:
    v = env.get("versions", {})
    jt, tt = env.get("jax_tflops", {}), env.get("torch_tflops", {})
    d16 = env.get("dtype16", "bfloat16")
    rows = [
        ("platform", env.get("platform")),
        ("device", f"{env.get('device_kind')} x{env.get('device_count')}"),
        ("compute capability", env.get("compute_capability")),
        ("device memory GiB (JAX's limit)", fmt(env.get("memory_gib"), ".1f")),
        ("driver", env.get("driver") or "-"),
        ("versions", ", ".join(f"{k} {val or 'absent'}" for k, val in v.items())),
        ("training dtype", d16 + (" (loss scaling)" if d16 == "float16" else "")),
        (
            f"matmul TFLOP/s {d16}, {env.get('matmul_n')}^3: JAX / PyTorch",
            f"{fmt(jt.get(d16), '.1f')} / {fmt(tt.get(d16), '.1f', 'n/a')}",
        ),
        (
            "matmul TFLOP/s float32: JAX (default precision) / PyTorch (TF32 "
            f"{'on' if env.get('torch_tf32') else 'off'})",
            f"{fmt(jt.get('float32'), '.1f')} / {fmt(tt.get('float32'), '.1f', 'n/a')}",
        ),
    ]
    return "| item | value |\n|---|---|\n" + "\n".join(f"| {k} | {val} |" for k, val in rows)


def table_parity(rows: list[dict], d16: str) -> str:
    out = [
        f"| config | ours float32 | ours float32, highest precision | ours {d16} | "
        f"PyTorch autocast {d16} |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if _err(r):
            out.append(f"| {r.get('config')} | {r['error']} | | | |")
            continue
        out.append(
            f"| {r['config']} | {r['float32']:.2e} | {r['float32 highest']:.2e} | {r[d16]:.2e} "
            f"| {r[f'torch_{d16}']:.2e} |"
        )
    return "\n".join(out) + "\n\nmax |x - PyTorch float32 (TF32 off)| in km/s, same device."


def _mfu(rec: dict, flops: float | None, rate: float | None) -> float | None:
    if not (flops and rate and rec.get("step_s")):
        return None
    return 100 * flops / rec["step_s"] / (rate * 1e12)


def table_train(rows: list[dict], rate: float | None) -> str:
    out = [
        "| config | implementation | samples/s | step s | compile s | peak GiB | ours / this "
        "| MFU % | attention / remat |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    by_config: dict[str, dict] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["impl"]] = r
    for config, impls in by_config.items():
        ours = impls.get("ours", {})
        flops = ours.get("model_flops")
        for impl, r in impls.items():
            if _err(r):
                out.append(f"| {config} | {impl} | {r['error']} | | | | | | |")
                continue
            ratio = (
                fmt(ours.get("samples_per_s") and ours["samples_per_s"] / r["samples_per_s"], ".2f")
                if impl != "ours"
                else "-"
            )
            how = f"{r['attention']} / {r['remat']}" if impl == "ours" else "-"
            out.append(
                f"| {config} | {impl} | {r['samples_per_s']:.2f} | {r['step_s']:.3f} | "
                f"{r['compile_s']:.0f} | {fmt(r.get('peak_gib'), '.1f')} | {ratio} | "
                f"{fmt(_mfu(r, flops, rate), '.0f')} | {how} |"
            )
    return "\n".join(out)


def table_infer(rec: dict) -> str:
    if _err(rec):
        return f"| path | samples/s |\n|---|---|\n| {rec.get('path', 'infer')} | {rec['error']} |"
    theirs = rec.get("torch")
    return (
        "| path | samples/s | vs PyTorch | max abs diff km/s |\n|---|---:|---:|---:|\n"
        f"| ours: {rec['path']}, {rec['members']} x {rec['config']}, flip TTA, {rec['dtype']} "
        f"| {rec['ours']:.2f} | {fmt(theirs and rec['ours'] / theirs, '.2f')} | "
        f"{fmt(rec.get('diff'), '.2e')} |\n"
        f"| PyTorch, member by member, batch 1 | {fmt(theirs, '.2f', 'n/a')} | 1.00 | |"
    )


def table_synth(rows: list[dict]) -> str:
    out = ["| profile | samples | samples/s | first call s (compile) |", "|---|---:|---:|---:|"]
    for r in rows:
        if _err(r):
            out.append(f"| {r.get('profile')} | {r['error']} | | |")
            continue
        out.append(
            f"| {r['profile']} | {r['samples']} | {r['samples_per_s']:.3f} | {r['first_s']:.1f} |"
        )
    return "\n".join(out)


def projection(train: list[dict], flops: dict[str, float], smoke: bool) -> list[dict]:
    """Hours of the reference's 22 runs from the measured rates (see the module docstring)."""
    from fwi_jax.config import load_config

    rates: dict[str, dict[str, float]] = {}
    for r in train:
        if "samples_per_s" in r:
            rates.setdefault(r["config"], {})[r["impl"]] = r["samples_per_s"]
    base = rates.get("base_s6", {})
    rows = []
    for config, runs in REFERENCE_RUNS.items():
        cfg = load_config(config)
        steps = cfg.train.epochs * (REFERENCE_TRAIN_SAMPLES // cfg.train.batch_size)
        row = {"config": config, "runs": runs, "steps": steps, "how": "measured"}
        got = rates.get(config)
        if not got and base and flops.get(config) and flops.get("base_s6"):
            scale = flops["base_s6"] / flops[config]
            got = {k: v * scale for k, v in base.items()}
            row["how"] = "scaled from base_s6 by model FLOPs"
        for impl in ("ours", "torch eager", "torch.compile"):
            sps = (got or {}).get(impl)
            row[impl] = runs * steps * cfg.train.batch_size / sps / 3600 if sps else None
        rows.append(row)
    if smoke:
        for row in rows:
            row["how"] += " (smoke: reduced shapes, not meaningful)"
    return rows


def table_projection(rows: list[dict]) -> str:
    out = [
        "| config | runs | steps per run | ours h | PyTorch eager h | PyTorch compile h | how |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    totals = {k: 0.0 for k in ("ours", "torch eager", "torch.compile")}
    for r in rows:
        for k in totals:
            totals[k] = None if totals[k] is None or r[k] is None else totals[k] + r[k]
        out.append(
            f"| {r['config']} | {r['runs']} | {r['steps']:,} | {fmt(r['ours'], '.1f')} | "
            f"{fmt(r['torch eager'], '.1f')} | {fmt(r['torch.compile'], '.1f')} | {r['how']} |"
        )
    out.append(
        f"| all 22 | 22 | | {fmt(totals['ours'], '.1f')} | {fmt(totals['torch eager'], '.1f')} | "
        f"{fmt(totals['torch.compile'], '.1f')} | the reference: {REFERENCE_V100_HOURS:.0f} "
        "V100-hours |"
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# The run


def plan(a) -> dict[str, list[tuple]]:
    """(job, args...) per section; the 16-bit dtype is filled in after the env job."""
    quick = a.quick
    parity = ["tiny_s8", "base_s6"]
    train = [
        ("base_s6", "ours"),
        ("base_s6", "torch eager"),
        ("base_s6", "torch.compile"),
        ("tiny_s8", "ours"),
        ("tiny_s8", "torch eager"),
    ]
    if not quick:
        train += [("tiny_s8", "torch.compile")]
        train += [("base_s8", "ours"), ("base_s8", "torch eager"), ("base_s8", "torch.compile")]
    if a.smoke:  # every job's code once, on the smallest set that covers it
        parity, train = (
            ["tiny_s8"],
            [("base_s6", i) for i in ("ours", "torch eager", "torch.compile")],
        )
    return {"parity": parity, "train": train}


def estimate(todo: dict, sections: list[str]) -> dict[str, int]:
    """Guessed seconds per section on one H100 (GUESS_S), to print before the run."""
    jobs = {
        "ours": "train_ours",
        "torch eager": "train_torch",
        "torch.compile": "train_torch_compile",
    }
    out = {"env": GUESS_S["env"]}
    if "parity" in sections:
        out["parity"] = GUESS_S["parity"] * len(todo["parity"])
    if "train" in sections:
        out["train"] = sum(GUESS_S[jobs[impl]] for _, impl in todo["train"])
    if "infer" in sections:
        out["infer"] = GUESS_S["infer"]
    if "synth" in sections:
        out["synth"] = 2 * GUESS_S["synth"]
    if "projection" in sections:
        out["projection"] = GUESS_S["flops"]
    out["total"] = sum(out.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the sections that matter most")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a test)")
    ap.add_argument(
        "--sections", nargs="+", choices=SECTIONS, help="default: all (--quick: not synth)"
    )
    ap.add_argument("--json", default="gpu_bench.json", help="where to write the records")
    ap.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds after which no job starts and a running one is ended (--quick: "
        f"{QUICK_LIMIT_S})",
    )
    ap.add_argument("--job", help=argparse.SUPPRESS)  # child: [name, options, args]
    a = ap.parse_args(argv)
    if a.job:
        return child_main(a.job)
    if a.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    t_start = time.time()
    limit = a.time_limit or (QUICK_LIMIT_S if a.quick else None)
    o = {"smoke": a.smoke, "deadline": t_start + limit if limit else None}
    sections = a.sections or [s for s in SECTIONS if not (a.quick and s == "synth")]
    todo = plan(a)
    missing_torch = _missing_torch()
    notes = []
    if missing_torch:
        notes.append(f"PyTorch columns: {missing_torch}")
    if importlib.util.find_spec("grain") is None:
        notes.append("grain not installed: inference is timed on arrays in memory, not files")
    for n in notes:
        print(n, flush=True)
    print(
        f"mode {'smoke' if a.smoke else 'quick' if a.quick else 'full'}; sections "
        f"{', '.join(sections)}; time limit {fmt(limit, '.0f', 'none')} s; guessed seconds on one "
        "H100 (no GPU has run this yet): "
        + ", ".join(f"{k} ~{v}" for k, v in estimate(todo, sections).items()),
        flush=True,
    )
    out: dict = {"mode": "smoke" if a.smoke else "quick" if a.quick else "full", "notes": notes}
    walls: dict[str, float] = {}
    tables: dict[str, str] = {}

    def section(name, title, body_fn):
        t0 = time.perf_counter()
        body = body_fn()
        walls[name] = time.perf_counter() - t0
        tables[name] = f"## {title} ({platform}; {walls[name]:.0f} s)\n\n{body}"
        print("\n" + tables[name] + "\n", flush=True)
        if a.json:
            pathlib.Path(a.json).write_text(json.dumps({**out, "wall_s": walls}, indent=1))

    t0 = time.perf_counter()
    env = run_job(o, "env")
    walls["env"] = time.perf_counter() - t0
    out["env"] = env
    platform = env.get("platform", "unknown")
    d16 = env.get("dtype16", "bfloat16")
    rate = (env.get("jax_tflops") or {}).get(d16)
    tables["env"] = f"## 1. Environment ({platform}; {walls['env']:.0f} s)\n\n" + (
        env["error"] if _err(env) else table_env(env)
    )
    print("\n" + tables["env"] + "\n", flush=True)
    if platform == "cpu" and not a.smoke:
        print("no GPU: this run measures the CPU (JAX sees no GPU; install jax[cuda12])")

    if "parity" in sections:

        def parity():
            if missing_torch:
                out["parity"] = [{"error": f"n/a: {missing_torch}"}]
                return f"n/a: {missing_torch}"
            out["parity"] = [run_job(o, "parity", c, d16) for c in todo["parity"]]
            for r in out["parity"]:
                r.setdefault("config", "?")
            return table_parity(out["parity"], d16)

        section("parity", "2. Parity of the forward pass", parity)

    if "train" in sections or "projection" in sections:

        def train():
            rows = []
            for config, impl in todo["train"]:
                if impl != "ours" and missing_torch:
                    rec = {"error": f"n/a: {missing_torch}", "wall_s": 0.0}
                else:
                    job = {"ours": "train_ours", "torch eager": "train_torch"}.get(
                        impl, "train_torch_compile"
                    )
                    rec = run_job(o, job, config, d16)
                rec.update(config=config, impl=impl)
                rows.append(rec)
                print(
                    f"train {config} {impl}: "
                    + (rec.get("error") or f"{rec['samples_per_s']:.2f} samples/s")
                    + f" ({rec['wall_s']:.0f} s)",
                    flush=True,
                )
            out["train"] = rows
            return table_train(rows, rate) + (
                f"\n\nMFU: model FLOPs per step (XLA's count of our step with xla attention and no "
                f"remat) / step time / the {d16} matmul rate under JAX in section 1 "
                f"({fmt(rate, '.1f')} TFLOP/s). ours / this: our samples/s over the row's."
            )

        section("train", f"3. Training, batch {2 if a.smoke else BATCH}, {d16}", train)

    if "infer" in sections:

        def infer_():
            if missing_torch:
                out["infer"] = {"error": f"n/a: {missing_torch}"}
                return f"n/a: {missing_torch}"
            out["infer"] = run_job(o, "infer", d16)
            return table_infer(out["infer"])

        section("infer", "4. Inference", infer_)

    if "synth" in sections:

        def synth_():
            out["synth"] = [{**run_job(o, "synth", p), "profile": p} for p in ("devito", "cpml8")]
            return table_synth(out["synth"])

        section("synth", "5. Synthesis", synth_)

    if "projection" in sections:

        def project():
            measured = {
                r["config"]: r.get("model_flops")
                for r in out.get("train", [])
                if r.get("impl") == "ours"
            }
            flops = {}
            for config in REFERENCE_RUNS:
                flops[config] = measured.get(config) or run_job(o, "flops", config, d16).get(
                    "model_flops"
                )
            out["projection"] = projection(out.get("train", []), flops, a.smoke)
            return table_projection(out["projection"]) + (
                f"\n\nsteps = epochs x floor({REFERENCE_TRAIN_SAMPLES:,} / batch 8); hours = "
                "runs x steps x 8 / samples/s of section 3."
            )

        section("projection", "6. Projection: the reference's 22 training runs", project)

    total = time.time() - t_start
    out["wall_s"] = {**walls, "total": total}
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=1))
    print("\n# fwi-jax GPU bench: summary\n")
    for n in notes:
        print(f"- {n}")
    print(
        "\n| section | wall s |\n|---|---:|\n"
        + "\n".join(f"| {k} | {v:.0f} |" for k, v in walls.items())
        + f"\n| total | {total:.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
