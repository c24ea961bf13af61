"""Where the time of our jitted train step goes: a jax.profiler trace of one step, summarised.

``--infer`` profiles the inference forward pass instead (``fwi_jax.model.apply_model`` on one
member at ``--batch``; flip TTA runs it twice), categorised the same way.

Builds the real train step exactly as scripts/bench_train.py does (real model, the config's
optimiser, ``fwi_jax.train.make_train_step``), compiles it, runs ``--warmup`` steps, then traces
``--steps`` steps with ``jax.profiler.trace``. XLA's CPU runtime records one event per executed
HLO instruction (thunk) with its name (``hlo_op``); the script maps each instruction to the
model code that produced it through the compiled HLO's source metadata (stack frames: file,
function, line) and sums the events' durations per category:

  attention core   fwi_jax/model/attention.py (scores, softmax, p @ v and their backward)
  rope             fwi_jax/model/rope.py (outside attention "onednn", whose kernel rotates)
  attn qkv/proj    the rest of eva02.Attention (qkv and output projections, bias, head split)
  mlp              eva02.SwiGLU (fc1, SiLU gate, fc2)
  layernorm        flax LayerNorm (norm1, norm2, mlp norm)
  residual/block   eva02.Block (the residual adds)
  fold+resize      fwi_jax.preprocess (fold, bilinear resize as two matmuls)
  embed/head       fwi_jax/model/fwi.py (patch embedding, cls/pos, channel mean, head, sigmoid)
  loss             fwi_jax/loss.py
  optimizer+EMA    optax, fwi_jax/optim.py (AdamW, EMA, loss scale, finiteness checks)
  other            anything else (copies XLA inserted, parameter plumbing)

and splits each into forward / backward (JAX's name stack says ``transpose(jvp(...))`` for the
backward pass; a rematerialised forward counts as backward work) -- plus the instruction
kind (YNNPACK fusion = dot with fused elementwise/reduction, loop fusion, copy, while...).
Durations are thunk wall times; thunks that XLA runs concurrently overlap, so the sum can
exceed the step's wall time, and ``thread-busy`` per runtime thread shows how much of the step
ran on more than one thread.

    .venv/bin/python scripts/profile_train.py --config tiny_s8 --batch 1 --attention auto --remat
    dots

Printed: step wall / CPU seconds, a Markdown table per category and the 20 most expensive
instructions.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

from bench_common import make_batch

CATEGORIES = (
    "attention core",
    "rope",
    "attn qkv/proj",
    "mlp",
    "layernorm",
    "residual/block",
    "fold+resize",
    "embed/head",
    "loss",
    "optimizer+EMA",
    "other",
)


def _class_ranges(module) -> list[tuple[str, int, int]]:
    import inspect

    out = []
    for name, obj in vars(module).items():
        if inspect.isclass(obj) and obj.__module__ == module.__name__:
            lines, start = inspect.getsourcelines(obj)
            out.append((name, start, start + len(lines) - 1))
    return out


def _frame_category(file: str, func: str, line: int, eva_classes) -> str | None:
    if file.endswith("fwi_jax/model/rope.py"):
        return "rope"
    if file.endswith("fwi_jax/model/attention.py"):
        return "attention core"
    if file.endswith("fwi_jax/model/eva02.py"):
        for cls, a, b in eva_classes:
            if a <= line <= b:
                return {
                    "Attention": "attn qkv/proj",
                    "SwiGLU": "mlp",
                    "Block": "residual/block",
                }.get(cls)
        return None
    if file.endswith("flax/nnx/nn/normalization.py"):
        return "layernorm"
    if file.endswith("fwi_jax/model/layers.py"):  # dense and silu_mul: the calling module's part
        return "layernorm" if "layer_norm" in func or "LayerNorm" in func else None
    if file.endswith("fwi_jax/preprocess.py"):
        return "fold+resize"
    if file.endswith("fwi_jax/model/fwi.py"):
        return "embed/head"
    if file.endswith("fwi_jax/loss.py"):
        return "loss"
    if "/optax/" in file or file.endswith("fwi_jax/optim.py"):
        return "optimizer+EMA"
    return None


def _lines_by_computation(hlo_text: str):
    """(name of the enclosing computation, line) for each line of an HLO module's text below a
    computation header."""
    computation = None
    for line in hlo_text.splitlines():
        c = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
        if c:
            computation = c.group(1)
            continue
        yield computation, line


def hlo_categories(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """instruction name -> (category, 'fwd'|'bwd', kind) from the compiled HLO's metadata."""
    from fwi_jax.model import eva02

    eva_classes = _class_ranges(eva02)
    section = None
    files, funcs, locs, frames = {}, {}, {}, {}
    for line in hlo_text.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if not s or s.startswith(("%", "ROOT", "ENTRY", "HloModule", "}")):
            section = None if (s.startswith(("%", "ENTRY")) or not s) else section
            continue
        m = re.match(r"(\d+) (.*)", s)
        if not m or section is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if section == "FileNames":
            files[i] = rest.strip('"')
        elif section == "FunctionNames":
            funcs[i] = rest.strip('"')
        elif section == "FileLocations":
            d = dict(re.findall(r"(\w+)=(\d+)", rest))
            locs[i] = (
                files.get(int(d["file_name_id"]), "?"),
                funcs.get(int(d["function_name_id"]), "?"),
                int(d.get("line", 0)),
            )
        elif section == "StackFrames":
            d = dict(re.findall(r"(\w+)=(\d+)", rest))
            # parent printed 1-based
            frames[i] = (int(d["file_location_id"]), int(d["parent_frame_id"]) - 1)

    def frame_cat(fid: int) -> str:
        seen = 0
        while fid in frames and seen < 200:
            loc, parent = frames[fid]
            if loc in locs:
                cat = _frame_category(*locs[loc], eva_classes)
                if cat:
                    return cat
            if parent == fid or parent <= 0:
                break
            fid, seen = parent, seen + 1
        return "other"

    # metadata of each computation's instructions: a fusion XLA made without metadata of its
    # own is attributed to the first instruction inside it that has some
    inner: dict[str, tuple[str, str]] = {}
    for computation, line in _lines_by_computation(hlo_text):
        sf = re.search(r"stack_frame_id=(\d+)", line)
        if computation and sf and computation not in inner:
            op_name = re.search(r'op_name="([^"]*)"', line)
            inner[computation] = (sf.group(1), op_name.group(1) if op_name else "")

    out = {}
    inst = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
    for computation, line in _lines_by_computation(hlo_text):
        m = inst.match(line)
        if not m:
            continue
        name, rest = m.groups()
        if "stack_frame_id=" not in rest:
            # no metadata (XLA dropped it, e.g. a dot whose unit batch axis it removed): take that
            # of the computation it calls, else that of the computation (loop body) it sits in
            called = re.search(r"calls=%([\w.\-]+)", rest)
            for where in ((called.group(1),) if called else ()) + (computation,):
                if where in inner:
                    frame, op_name = inner[where]
                    rest += f' metadata={{op_name="{op_name}" stack_frame_id={frame}}}'
                    break
        op = re.search(r"([a-z][\w\-]*)\(", rest)  # shapes (tuples included) hold no "word("
        if not op:
            continue
        opcode = op.group(1)
        kind = opcode
        if opcode == "fusion":
            k = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(k\w+)", line)
            kind = f"fusion {k.group(1)}" if k else "fusion"
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        sf = re.search(r"stack_frame_id=(\d+)", rest)
        cat = frame_cat(int(sf.group(1))) if sf else "other"
        direction = (
            "bwd"
            if (
                "transpose(" in op_name
                or "rematted_computation" in op_name
                or "checkpoint" in op_name
            )
            else "fwd"
        )
        out[name] = (cat, direction, kind)
    return out


def trace_events(logdir: str) -> tuple[list[tuple[str, str, int, int]], float]:
    """[(hlo_op, thread line, start_ns, duration_ns)] of XLA's runtime events in the trace."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    pd = ProfileData.from_file(path)
    events = []
    for plane in pd.planes:
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                op = stats.get("hlo_op")
                if op is None or e.name.startswith("end: "):
                    continue
                events.append((str(op), line.name, int(e.start_ns), int(e.duration_ns)))
    return events, 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_s8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="traced steps (the table is per step)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument(
        "--infer", action="store_true", help="profile the inference forward pass, not a step"
    )
    from fwi_jax.config import (
        add_override_argument,  # no JAX import: XLA_FLAGS can still be set after
    )

    add_override_argument(ap)
    ap.add_argument(
        "--logdir", default=None, help="keep the trace here (default: a temporary folder)"
    )
    ap.add_argument(
        "--dump",
        default=None,
        metavar="DIR",
        help="write the compiled HLO (step.hlo.txt) and each instruction's s/step (ops.json) here",
    )
    a = ap.parse_args(argv)

    from fwi_jax.host import tune_cpu_host

    tune_cpu_host()  # as train and infer run (FWI_JAX_CPU_TUNING=0 profiles XLA's defaults)
    import jax
    import jax.numpy as jnp

    from fwi_jax.config import load_config
    from fwi_jax.model import apply_model, create_model
    from fwi_jax.model.attention import resolve_impl
    from fwi_jax.optim import make_optimizer
    from fwi_jax.train import create_train_state, make_train_step

    cfg = load_config(
        a.config,
        [
            *a.set,
            f"model.dtype={a.dtype}",
            f"model.attention={a.attention}",
            f"model.remat={a.remat}",
        ],
    )
    graphdef, params = create_model(cfg, seed=0)
    x, v = make_batch(cfg, a.batch)
    if a.infer:  # the "state" is the parameters, kept; the "step" one forward pass

        def step(params, batch):
            return params, apply_model(graphdef, params, batch["x"])

        state, donate = params, ()
    else:
        tx, schedule = make_optimizer(cfg, total_steps=1000)
        step = make_train_step(cfg, graphdef, tx, schedule, ema_start_step=0)
        state, donate = create_train_state(cfg, params, tx), 0
    del params
    batch = {"x": jnp.asarray(x), "v": jnp.asarray(v)}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=donate).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cats = hlo_categories(compiled.as_text())
    for _ in range(a.warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))

    logdir = a.logdir or tempfile.mkdtemp(prefix="fwi_profile_")
    walls, cpus = [], []
    with jax.profiler.trace(logdir):
        for _ in range(a.steps):
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    events, _ = trace_events(logdir)
    # while loops' thunks contain their bodies' events: count only leaves
    whiles = {n for n, (_, _, k) in cats.items() if k in ("while", "call", "conditional")}
    leaf = [e for e in events if e[0] not in whiles]
    per = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    per_kind = collections.defaultdict(float)
    count = collections.Counter()
    busy = collections.defaultdict(float)
    for op, line, _, dur in leaf:
        cat, direction, kind = cats.get(op, ("other", "fwd", "?"))
        per[(cat, direction)] += dur / a.steps
        per_op[op] += dur / a.steps
        per_kind[kind] += dur / a.steps
        count[cat] += 1
        busy[line] += dur / a.steps
    total = sum(per.values())
    if a.dump:
        out = pathlib.Path(a.dump)
        out.mkdir(parents=True, exist_ok=True)
        (out / "step.hlo.txt").write_text(compiled.as_text())
        (out / "ops.json").write_text(
            json.dumps({op: v / 1e9 for op, v in per_op.items()}, indent=0)
        )
    wall, cpu = statistics.median(walls), statistics.median(cpus)

    print(
        f"{'inference forward' if a.infer else 'train step'}: "
        f"config {a.config} {' '.join(a.set)} batch {a.batch} {a.dtype}, attention {a.attention} "
        f"(= {resolve_impl(a.attention)}), remat {a.remat}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    print(
        f"compile {compile_s:.1f} s; step wall {wall:.2f} s, CPU {cpu:.2f} s/step; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"sum of traced instruction time {total / 1e9:.2f} s/step over {len(leaf) // a.steps} "
        "instruction "
        f"executions/step; per runtime thread (busy s/step): "
        + ", ".join(
            f"{k.split('/')[0]}#{i}: {v / 1e9:.2f}"
            for i, (k, v) in enumerate(sorted(busy.items(), key=lambda kv: -kv[1])[:6])
        )
    )
    print(
        "\n| part | forward s | backward (+ recompute) s | total s | share of traced time "
        "|\n|---|---:|---:|---:|---:|"
    )
    for cat in CATEGORIES:
        f, b = per.get((cat, "fwd"), 0.0), per.get((cat, "bwd"), 0.0)
        if f + b == 0:
            continue
        print(
            f"| {cat} | {f / 1e9:.2f} | {b / 1e9:.2f} | {(f + b) / 1e9:.2f} | "
            f"{100 * (f + b) / total:.0f} % |"
        )
    print(
        f"| **sum** | {sum(v for (c, d), v in per.items() if d == 'fwd') / 1e9:.2f} | "
        f"{sum(v for (c, d), v in per.items() if d == 'bwd') / 1e9:.2f} | {total / 1e9:.2f} | 100 "
        "% |"
    )
    print("\n| instruction kind | s/step | share |\n|---|---:|---:|")
    for kind, v in sorted(per_kind.items(), key=lambda kv: -kv[1])[:8]:
        print(f"| {kind} | {v / 1e9:.2f} | {100 * v / total:.0f} % |")
    print(f"\ntop {a.top} instructions (s/step, category, direction, kind):")
    for op, v in sorted(per_op.items(), key=lambda kv: -kv[1])[: a.top]:
        cat, direction, kind = cats.get(op, ("other", "fwd", "?"))
        print(f"  {v / 1e9:7.3f}  {op:40s} {cat:15s} {direction} {kind}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
