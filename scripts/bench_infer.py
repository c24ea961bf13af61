"""Inference throughput: our stacked ensemble vs the reference's way, in one run.

- ours: ``fwi_jax.infer.Predictor`` — N members of one config stacked and vmapped, flip TTA riding in
  the same batch, the weighted mean on device, one jitted program, batches sharded over devices;
- the reference's way: the PyTorch model (tests/torch_reference.py, timm Eva), one member after
  another, batch 1, TTA as a second forward pass, the mean on the host.

Both run the same random weights (the PyTorch state_dicts converted by ``fwi_jax.convert``); the
script prints the largest difference between the two ensembles as a check. Inputs are random
(6, 10000, 31) arrays in memory, so the figures are compute only (no file reading).

    python scripts/bench_infer.py [--config tiny_s8] [--members 3] [--batch 2] [--samples 2]
        [--torch-samples 1] [--dtype float32] [--no-tta] [--set model.attention=xla]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np

from fwi_jax.host import tune_cpu_host

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # torch_reference.py

from fwi_jax import infer  # noqa: E402
from fwi_jax.config import add_override_argument, load_config  # noqa: E402
from fwi_jax.convert import convert_state_dict  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny_s8")
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="global batch of ours")
    ap.add_argument("--samples", type=int, default=2, help="samples timed for ours (after one warm-up batch)")
    ap.add_argument("--torch-samples", type=int, default=1, help="samples timed for the PyTorch reference (0: skip)")
    ap.add_argument("--dtype", default="float32", choices=infer.DTYPES)
    ap.add_argument("--no-tta", action="store_true")
    ap.add_argument("--member-chunk", type=int)
    add_override_argument(ap)
    args = ap.parse_args(argv)
    tune_cpu_host()  # ours runs as `python -m fwi_jax.infer` does (FWI_JAX_CPU_TUNING=0: XLA's defaults)
    import torch

    from torch_reference import ReferenceModel, randomize_

    tta = not args.no_tta
    cfg = load_config(args.config, [*args.set, f"model.dtype={args.dtype}"])
    refs = [randomize_(ReferenceModel(cfg), seed=s).eval() for s in range(args.members)]
    members = []
    for s, ref in enumerate(refs):
        params, _ = convert_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()}, cfg)
        members.append(infer.Member(cfg=cfg, params=params, weight=1.0, source=f"random seed {s}"))
    predictor = infer.Predictor(infer.group_members(members), tta=tta, member_chunk=args.member_chunk)
    batch = -(-args.batch // predictor.n_devices) * predictor.n_devices
    g = cfg.geometry
    rng = np.random.default_rng(0)
    n_batches = max(1, -(-args.samples // batch))
    xs = [rng.standard_normal((batch, 6, g.n_time, g.n_receivers)).astype(np.float32) for _ in range(n_batches + 1)]

    print(f"config {cfg.name} ({args.dtype}, attention {cfg.model.attention}), {args.members} members, "
          f"TTA {'on' if tta else 'off'}; {predictor.n_devices} {jax.devices()[0].platform} device(s), "
          f"{torch.get_num_threads()} torch threads")
    t0 = time.perf_counter()
    first = predictor(xs[0])  # compile + warm-up
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    pending = None
    for x in xs[1:]:  # one batch in flight, as fwi_jax.infer runs
        y = predictor.dispatch(x)
        if pending is not None:
            predictor.fetch(pending)
        pending = y
    predictor.fetch(pending)
    t_ours = time.perf_counter() - t0
    ours = n_batches * batch / t_ours
    print(f"ours: compile + first batch {t_compile:.1f} s; {n_batches * batch} samples in {t_ours:.1f} s "
          f"= {ours:.3f} samples/s (batch {batch})")

    how = "stacked vmap" if not args.member_chunk else f"stacked, lax.map in chunks of {args.member_chunk}"
    rows = [(f"ours: {how}, TTA in batch, one jit", batch, ours)]
    if args.torch_samples > 0:
        autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)

        def reference_ensemble(x_np):
            x = torch.from_numpy(x_np[None])
            outs = []
            with torch.inference_mode(), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                for ref in refs:  # one model after another, batch 1
                    y = ref(x).float()
                    if tta:
                        y = 0.5 * (y + ref(x.flip(1, 3)).float().flip(2))
                    outs.append(y[0].numpy())
            return np.mean(outs, axis=0)

        check = reference_ensemble(xs[0][0])
        diff = float(np.abs(check - first[0]).max())
        t0 = time.perf_counter()
        for i in range(args.torch_samples):
            reference_ensemble(xs[1 + i // batch % n_batches][i % batch])
        t_ref = time.perf_counter() - t0
        theirs = args.torch_samples / t_ref
        print(f"reference way (PyTorch, member by member, batch 1): {args.torch_samples} samples in {t_ref:.1f} s "
              f"= {theirs:.3f} samples/s; max |ours - reference| = {diff:.2e} km/s")
        rows.append(("reference: PyTorch, member by member, batch 1", 1, theirs))
    print("\n| path | batch | samples/s |\n|---|---|---|")
    for name, b, sps in rows:
        print(f"| {name} | {b} | {sps:.3f} |")
    if len(rows) == 2:
        print(f"\nratio ours / reference: {rows[0][2] / rows[1][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
