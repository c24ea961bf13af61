"""Training throughput of our jitted train step and of the PyTorch reference, in one run.

For each (attention, remat) pair — one subprocess each, so memory is returned between them and a
failure stays local — the script builds the real model (``fwi_jax.model.create_model``), the
config's optimiser (``fwi_jax.optim.make_optimizer``) and the train step
(``fwi_jax.train.make_train_step``: forward, the config's loss, backward, AdamW, EMA, loss-scale
bookkeeping), then

  1. lowers and compiles ``jax.jit(step, donate_argnums=0)`` once (compile seconds);
  2. reads XLA's FLOPs per step (``compiled.cost_analysis()``) and its memory estimate
     (``compiled.memory_analysis()``: argument + output + temp - alias bytes);
  3. unless ``--compile-only``: runs ``--warmup`` steps, then times ``--steps`` steps
     (``block_until_ready`` after each) and reports the median as samples/s, the achieved FLOP/s
     (XLA FLOPs / median step time) and its share of this machine's dense-matmul FLOP/s (a jitted
     float32 matmul, the practical roofline, measured in the parent process).

The PyTorch reference (tests/torch_reference.py: timm ``Eva`` arranged as the reference solution;
for the first place's configs, ``geometry.head=token_linear``, their module from
tests/torch_firstplace.py) then trains on the same batch size and input shapes in train mode with
AdamW (lr 2e-4, betas (0.9, 0.95), weight decay 0.01) and the same loss (``train.loss``: base or
hard-mining), in float32 or under ``torch.autocast("cpu", dtype)`` for bfloat16/float16; the
script reports its samples/s and the ratio ours / PyTorch. A Markdown table closes the output.

    .venv/bin/python scripts/bench_train.py [--config tiny_s8] [--batch 1] [--dtype float32]
        [--attention xla blockwise] [--remat none full dots] [--steps 5] [--warmup 2]
        [--cpu-tuning on off] [--no-torch] [--torch-around] [--compile-only] [--set model.depth=2
        ...]

Our rows run with fwi_jax.host.tune_cpu_host applied, as ``train`` and ``infer`` run
(``--cpu-tuning off`` adds or selects rows with XLA's defaults); "CPU s/step (system)" shows
the kernel's share, which that tuning removes.

Timings on a shared machine are noisy: the table also gives the CPU seconds per step (process
time, which other load inflates less than wall time). Only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from bench_common import (
    GIB,
    compiled_flops,
    compiled_memory_gib,
    fmt,
    make_batch,
    matmul_roofline,
    our_train_step,
    torch_loss,
)

DTYPES = ("float32", "bfloat16", "float16")


def overrides(a, attention: str | None = None, remat: str | None = None) -> list[str]:
    out = [*a.set, f"model.dtype={a.dtype}"]
    if attention:
        out.append(f"model.attention={attention}")
    if remat:
        out.append(f"model.remat={remat}")
    return out


def time_steps(step, warmup: int, steps: int, batch: int) -> dict:
    """Run ``step()`` (returns the loss, after the step has finished) ``warmup`` + ``steps`` times;
    wall, CPU (process) and system seconds of the timed steps, their medians, samples/s."""
    wall, cpu, system = [], [], []
    loss = None
    for i in range(warmup + steps):
        t0, c0, s0 = time.perf_counter(), time.process_time(), os.times().system
        loss = step()
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            system.append(os.times().system - s0)
    return {
        "step_s": statistics.median(wall),
        "step_s_all": wall,
        "cpu_s": statistics.median(cpu),
        "sys_s": statistics.median(system),
        "samples_per_s": batch / statistics.median(wall),
        "loss": loss,
    }


def run_one(a) -> dict:
    """One (attention, remat) configuration of our step, in this process."""
    import jax

    from fwi_jax.config import load_config
    from fwi_jax.host import tune_cpu_host
    from fwi_jax.model.attention import resolve_impl

    host = tune_cpu_host(verbose=False)  # before anything starts a backend
    attention, remat = a.one
    cfg = load_config(a.config, overrides(a, attention, remat))
    rec = {
        "attention": attention,
        "resolved": resolve_impl(attention),
        "remat": remat,
        "host": host,
    }
    step, state, batch, rec["params"] = our_train_step(cfg, a.batch)

    jitted = jax.jit(step, donate_argnums=0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    rec["compile_s"] = time.perf_counter() - t0
    # XLA's cost analysis counts a loop's body once: no FLOP figure for scanned blocks
    rec["flops"] = None if cfg.model.scan_blocks else compiled_flops(compiled)
    rec["mem_gib"] = compiled_memory_gib(compiled)
    if a.compile_only:
        return rec
    if rec["mem_gib"] is not None and a.max_mem_gib and rec["mem_gib"] > a.max_mem_gib:
        rec["error"] = (
            f"not run: XLA estimate {rec['mem_gib']:.1f} GiB > --max-mem-gib {a.max_mem_gib}"
        )
        return rec

    def one_step():
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        return float(metrics["loss"])

    rec.update(time_steps(one_step, a.warmup, a.steps, a.batch))
    if rec["flops"]:
        rec["flop_per_s"] = rec["flops"] / rec["step_s"]
    return rec


def torch_train(a) -> dict:
    """The PyTorch reference's train step: samples/s (median of the timed steps)."""
    import torch
    from torch_firstplace import torch_model

    from fwi_jax.config import load_config

    cfg = load_config(a.config, overrides(a))
    if (
        cfg.geometry.head == "pixel_shuffle"
        and cfg.geometry.head_patch[0] != cfg.geometry.head_patch[1]
    ):
        return {
            "error": f"no reference: head_patch {cfg.geometry.head_patch} is not square "
            "(the reference's pixel shuffle is square only)"
        }
    torch.manual_seed(0)
    model = torch_model(cfg, seed=0).train()  # the reference's, or the first place's module
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, betas=(0.9, 0.95), weight_decay=0.01)
    x_np, v_np = make_batch(cfg, a.batch)
    x, v = torch.from_numpy(x_np), torch.from_numpy(v_np)
    autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(a.dtype)
    loss_fn = torch_loss(cfg)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            pred = model(x)
        loss = loss_fn(pred, v)
        loss.backward()
        opt.step()
        return float(loss)

    return {
        **time_steps(step, a.warmup, a.torch_steps, a.batch),
        "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }


def child(a, extra: list[str], cpu_tuning: str = "on") -> dict:
    cmd = [sys.executable, __file__, *extra]
    t0 = time.perf_counter()
    env = {**os.environ, "FWI_JAX_CPU_TUNING": "1" if cpu_tuning == "on" else "0"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT ") :])
            rec["wall_total_s"] = time.perf_counter() - t0
            return rec
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)[-400:]}


def default_attention() -> list[str]:
    from fwi_jax.model.attention import resolve_impl

    impls = ["xla", "blockwise"]
    if resolve_impl("auto") == "cudnn":  # a GPU of compute capability >= 8.0
        impls.insert(1, "cudnn")
    return impls


def label(rec) -> str:
    """Row label: attention (resolved), and the CPU tuning when it is off."""
    impl = rec["attention"] + (
        f" ({rec['resolved']})" if rec.get("resolved", rec["attention"]) != rec["attention"] else ""
    )
    return impl + (", CPU tuning off" if rec.get("cpu_tuning") == "off" else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_s8")
    ap.add_argument(
        "--batch", type=int, default=None, help="global batch (default 1 on CPU, 8 elsewhere)"
    )
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument(
        "--attention",
        nargs="+",
        default=None,
        help="implementations (default: every one valid here: xla, blockwise, +cudnn on sm80+)",
    )
    ap.add_argument("--remat", nargs="+", default=["none", "full", "dots"])
    ap.add_argument(
        "--cpu-tuning",
        nargs="+",
        default=["on"],
        choices=["on", "off"],
        help="fwi_jax.host.tune_cpu_host in our rows (on: as train/infer run; off: XLA defaults)",
    )
    # PyTorch's steps get faster over its first few while ours are flat after compiling: 2 warm-up
    # and 5 timed steps compare steady states
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument(
        "--torch-steps", type=int, default=None, help="timed PyTorch steps (default --steps)"
    )
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument(
        "--torch-around",
        action="store_true",
        help="run the PyTorch reference before and after our rows (median of both runs' steps): "
        "on a shared machine the load drifts during a run",
    )
    ap.add_argument(
        "--compile-only", action="store_true", help="compile, report FLOPs and memory; run nothing"
    )
    ap.add_argument(
        "--max-mem-gib",
        type=float,
        default=None,
        help="do not run a configuration whose XLA estimate exceeds this (default: 80%% of "
        "MemAvailable)",
    )
    from fwi_jax.config import (
        add_override_argument,  # no JAX import: XLA_FLAGS can still be set after
    )

    add_override_argument(ap)
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # child: ATTENTION REMAT
    ap.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # child
    a = ap.parse_args(argv)
    if a.torch_steps is None:
        a.torch_steps = a.steps

    if a.one or a.torch_only:
        try:
            rec = torch_train(a) if a.torch_only else run_one(a)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        print("RESULT " + json.dumps(rec), flush=True)
        return 0

    import jax

    platform = jax.devices()[0].platform
    if a.batch is None:
        a.batch = 1 if platform == "cpu" else 8
    if a.attention is None:
        a.attention = default_attention()
    if a.max_mem_gib is None:
        try:
            avail = next(
                int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")
            )
            a.max_mem_gib = 0.8 * avail * 1024 / GIB
        except (OSError, StopIteration):
            a.max_mem_gib = 0.0
    common = [
        "--config",
        a.config,
        "--batch",
        str(a.batch),
        "--dtype",
        a.dtype,
        "--steps",
        str(a.steps),
        "--warmup",
        str(a.warmup),
        "--torch-steps",
        str(a.torch_steps),
        "--max-mem-gib",
        str(a.max_mem_gib),
    ]
    if a.compile_only:
        common.append("--compile-only")
    if a.set:
        common += ["--set", *a.set]

    print(
        f"config {a.config} {' '.join(a.set)} batch {a.batch} {a.dtype}; {jax.device_count()} "
        f"{platform} "
        f"device(s) ({jax.devices()[0].device_kind}); os.cpu_count() {os.cpu_count()}; "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
        flush=True,
    )
    roof = None
    if not a.compile_only and platform == "cpu":
        roof = matmul_roofline()
        print(
            f"dense float32 matmul 2048^3 under XLA: {roof / 1e9:.1f} GFLOP/s (the practical "
            "roofline)",
            flush=True,
        )

    ref_before = None
    if a.torch_around and not a.no_torch and not a.compile_only:
        ref_before = child(a, [*common, "--torch-only"])
        if "error" not in ref_before:
            print(
                f"PyTorch reference, before our rows: {ref_before['samples_per_s']:.4f} samples/s "
                "(steps "
                f"{', '.join(f'{t:.1f}' for t in ref_before['step_s_all'])} s, CPU "
                f"{ref_before['cpu_s']:.1f} s/step, "
                f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})",
                flush=True,
            )

    records = []
    for attention, remat, tuning in itertools.product(a.attention, a.remat, a.cpu_tuning):
        rec = child(a, [*common, "--one", attention, remat], tuning)
        rec.setdefault("attention", attention)
        rec.setdefault("remat", remat)
        rec["cpu_tuning"] = tuning
        records.append(rec)
        msg = rec.get("error") or (
            f"compile {rec['compile_s']:.1f} s, XLA "
            f"{fmt(rec['flops'] and rec['flops'] / 1e12, '.3f')} TFLOP/step, "
            f"memory {fmt(rec['mem_gib'], '.2f')} GiB"
            + (
                ""
                if a.compile_only
                else f", {rec['samples_per_s']:.4f} samples/s (steps "
                f"{', '.join(f'{t:.1f}' for t in rec['step_s_all'])} s, "
                f"CPU {rec['cpu_s']:.1f} s/step of which system {rec['sys_s']:.1f}, loss "
                f"{rec['loss']:.4f})"
            )
        )
        print(
            f"ours {label(rec)} / {remat}: {msg} (load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())})",
            flush=True,
        )
        if a.json:  # partial results survive an interrupted run
            pathlib.Path(a.json).write_text(
                json.dumps({"args": vars(a), "roofline": roof, "ours": records}, indent=1)
            )

    ref = None
    if not a.no_torch and not a.compile_only:
        ref = child(a, [*common, "--torch-only"])
        if ref_before and "error" not in ref_before and "error" not in ref:
            walls = ref_before["step_s_all"] + ref["step_s_all"]
            ref = {
                **ref,
                "step_s_all": walls,
                "step_s": statistics.median(walls),
                "samples_per_s": a.batch / statistics.median(walls),
                "cpu_s": statistics.median([ref_before["cpu_s"], ref["cpu_s"]]),
                "sys_s": statistics.median([ref_before["sys_s"], ref["sys_s"]]),
            }
        if "error" in ref:
            print(f"PyTorch reference: {ref['error']}", flush=True)
        else:
            print(
                f"PyTorch reference ({ref['threads']} threads, {ref['params']:,} params): "
                f"{ref['samples_per_s']:.4f} samples/s (steps "
                f"{', '.join(f'{t:.1f}' for t in ref['step_s_all'])} s, "
                f"CPU {ref['cpu_s']:.1f} s/step of which system {ref['sys_s']:.1f}, loss "
                f"{ref['loss']:.4f})",
                flush=True,
            )

    print(f"\nload average at the end {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if a.compile_only:
        print(
            "\n| attention | remat | compile s | XLA TFLOP/step | XLA memory GiB "
            "|\n|---|---|---:|---:|---:|"
        )
        for r in records:
            if "error" in r and "compile_s" not in r:
                print(f"| {label(r)} | {r['remat']} | {r['error']} | | |")
                continue
            print(
                f"| {label(r)} | {r['remat']} | {r['compile_s']:.1f} | "
                f"{fmt(r['flops'] and r['flops'] / 1e12, '.3f')} | {fmt(r['mem_gib'], '.2f')} |"
            )
    else:
        ref_sps = ref.get("samples_per_s") if ref else None
        # XLA counts a lax.scan body once, so blockwise attention's FLOPs are undercounted; the
        # xla implementation without remat has no scan: its count is the model's FLOPs per step.
        model_flops = next(
            (
                r["flops"]
                for r in records
                if r.get("resolved") == "xla" and r["remat"] == "none" and r.get("flops")
            ),
            None,
        )
        if model_flops:
            print(
                "\nmodel FLOPs per step (XLA's count for xla attention, no remat): "
                f"{model_flops / 1e9:.0f} GFLOP"
            )
        print(
            "\n| implementation | remat | compile s | step s (median) | CPU s/step (system) | "
            "samples/s | XLA GFLOP/step "
            "| achieved GFLOP/s (XLA count) | % of matmul roofline | model GFLOP/s | XLA memory "
            "GiB | vs PyTorch |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in records:
            if "samples_per_s" not in r:
                print(
                    f"| ours {label(r)} | {r['remat']} | {fmt(r.get('compile_s'), '.1f')} | "
                    f"{r.get('error', '')} | | | "
                    f"{fmt(r.get('flops') and r['flops'] / 1e9, '.0f')} | | | | "
                    f"{fmt(r.get('mem_gib'), '.2f')} | |"
                )
                continue
            fps = r.get("flop_per_s")
            vs_ref = fmt(ref_sps and r["samples_per_s"] / ref_sps, ".2f", "n/a") + (
                "x" if ref_sps else ""
            )
            print(
                f"| ours {label(r)} | {r['remat']} | {r['compile_s']:.1f} | {r['step_s']:.2f} | "
                f"{r['cpu_s']:.1f} ({r['sys_s']:.1f}) | "
                f"{r['samples_per_s']:.4f} | {fmt(r['flops'] and r['flops'] / 1e9, '.0f')} | "
                f"{fmt(fps and fps / 1e9, '.1f')} | "
                f"{fmt(fps and roof and 100 * fps / roof, '.0f')} | "
                f"{fmt(model_flops and model_flops / r['step_s'] / 1e9, '.1f')} | "
                f"{fmt(r['mem_gib'], '.2f')} | {vs_ref} |"
            )
        if ref and "samples_per_s" in ref:
            print(
                "| PyTorch reference (timm, "
                f"{'float32' if a.dtype == 'float32' else 'autocast ' + a.dtype}) | - | - | "
                f"{ref['step_s']:.2f} | {ref['cpu_s']:.1f} ({ref['sys_s']:.1f}) | "
                f"{ref['samples_per_s']:.4f} | | | | "
                f"{fmt(model_flops and model_flops / ref['step_s'] / 1e9, '.1f')} | | 1.00x |"
            )
        if roof:
            print(f"\nmatmul roofline: {roof / 1e9:.1f} GFLOP/s (jitted float32 2048x2048 matmul)")
    if a.json:
        pathlib.Path(a.json).write_text(
            json.dumps({"args": vars(a), "roofline": roof, "ours": records, "torch": ref}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
