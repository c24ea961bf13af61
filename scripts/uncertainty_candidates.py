"""Which label-free confidence ranks the errors: every candidate of docs/uncertainty.md, measured
from one pass of the members over the samples.

    python scripts/uncertainty_candidates.py --data DIR --list heldout.txt --calib-list val.txt \
        --checkpoints RUN0 RUN1 [--devito DEVITO_DIR] [--out candidates.json]

For each sample of ``--list`` (and ``--calib-list``, labelled samples the members did not train on),
every member's two flip-TTA views and, for members with ``model.error_head``, their log-scales are
computed once (`fwi_jax.ensemble.member_views`). Then, for one member (member 0, its two views)
and for all members x views (equal weights), each candidate map is scored against the labels of
``--list``: Spearman(score, MAPE) over samples (score = the map's mean) and the mean relative
error per decile of the map, pixels pooled (`fwi_jax.uncertainty.rank_stats`). Candidates:

- ``spread``: the relative spread over members x views (what ``--uncertainty`` uses without heads);
- ``depth_prior``: a(z), the calibration samples' mean relative error at each depth (no sample
  information; its Spearman is undefined);
- ``depth_calibrated_spread``: a(z) + c(z) * spread, a and c (>= 0) fit per depth row by least
  squares on the calibration samples (labels needed once, not at inference);
- ``scale``: the error heads' b = exp(s), the members' and views' mean;
- ``scale+spread``: sqrt(b^2 + spread^2), what ``--uncertainty`` writes with heads.

``--devito DIR``: samples of the same velocity models made by devito (scripts/devito_samples.py);
prints the mean score of ``scale+spread`` (or ``spread`` without heads) on them beside the same
ids of ``--data``, and their MAPE.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
from tqdm import tqdm

from fwi_jax import uncertainty as unc
from fwi_jax.data import io as data_io
from fwi_jax.ensemble import group_members, member_views
from fwi_jax.host import tune_cpu_host
from fwi_jax.members import MemberSpec, load_member


def views_fn(members):
    """x (1, 6, T, R) -> per member ((2, depth, x) velocities, (2, depth, x) log-scales or None)."""
    fns = []
    for m in members:
        (group,) = group_members([m])
        head = m.cfg.model.error_head
        fc = m.cfg.geometry.flip_channels
        fns.append(
            (
                group.params,
                jax.jit(
                    lambda p, x, g=group, h=head, fc=fc: member_views(
                        g.graphdef, p, x, True, 1, False, None, fc, h
                    )
                ),
            )
        )

    def run(x):
        out = []
        for params, f in fns:
            v, s = f(params, x)
            out.append(
                (np.asarray(v[0, :, 0], np.float32), None if s is None else np.asarray(s[0, :, 0]))
            )
        return out

    return run


def collect(run, root, ids, desc):
    """id -> ([(views (2, depth, x), log-scales or None) per member], truth (depth, x) or None)."""
    out = {}
    for sid in tqdm(ids, desc=desc, unit="sample"):
        x, v = data_io.read_sample(root / sid)
        out[sid] = (run(x[None]), v)
    return out


def maps_of(per_member, use):
    """The candidates' inputs for members ``use``: (mean, spread, scale or None)."""
    views = np.concatenate([per_member[k][0] for k in use]).astype(np.float64)  # (V, depth, x)
    mean = views.mean(axis=0)
    spread = views.std(axis=0) / mean
    scales = [np.exp(per_member[k][1]).mean(axis=0) for k in use if per_member[k][1] is not None]
    scale = np.mean(scales, axis=0) if scales else None
    return mean, spread, scale


def fit_depth_calibration(calib, use):
    """Per depth row: least squares of the relative error on [1, spread] over the calibration
    samples' pixels, c clipped at 0. Returns (a (depth,), c (depth,))."""
    sx = sy = sxx = sxy = n = 0.0
    for per_member, v in calib.values():
        mean, spread, _ = maps_of(per_member, use)
        e = np.abs(mean - v) / v
        sx, sy = sx + spread.sum(1), sy + e.sum(1)
        sxx, sxy = sxx + (spread * spread).sum(1), sxy + (spread * e).sum(1)
        n += spread.shape[1]
    var = sxx / n - (sx / n) ** 2
    c = np.where(var > 0, (sxy / n - sx / n * sy / n) / np.maximum(var, 1e-30), 0.0).clip(0)
    a = sy / n - c * sx / n
    return a, c


def candidates(per_member, use, calibration):
    mean, spread, scale = maps_of(per_member, use)
    a, c = calibration
    out = {
        "spread": spread,
        "depth_prior": np.broadcast_to(a[:, None], spread.shape),
        "depth_calibrated_spread": a[:, None] + c[:, None] * spread,
    }
    if scale is not None:
        out["scale"] = scale
        out["scale+spread"] = np.sqrt(scale**2 + spread**2)
    return mean, out


def evaluate(samples, use, calibration):
    maps, errors, scores, mape = {}, {}, {}, {}
    for sid, (per_member, v) in samples.items():
        mean, cands = candidates(per_member, use, calibration)
        e = np.abs(mean - v) / v
        errors[sid], mape[sid] = e.astype(np.float16), float(e.mean())
        for name, m in cands.items():
            maps.setdefault(name, {})[sid] = m.astype(np.float16)
            scores.setdefault(name, {})[sid] = unc.sample_score(m)
    return {
        name: {
            **unc.rank_stats(scores[name], mape, maps[name], errors),
            "mean_score": float(np.mean(list(scores[name].values()))),
            "mean_mape": float(np.mean(list(mape.values()))),
        }
        for name in maps
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--list", required=True, help="held-out ids (scored)")
    ap.add_argument("--calib-list", required=True, help="labelled ids for the depth calibration")
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--devito", help="devito-made samples of some --list ids")
    ap.add_argument("--out", default="candidates.json")
    a = ap.parse_args()
    tune_cpu_host()
    root = pathlib.Path(a.data).expanduser()
    members = [load_member(MemberSpec(c)) for c in a.checkpoints]
    run = views_fn(members)
    held = collect(run, root, data_io.list_samples(root, a.list), "held-out")
    calib = collect(run, root, data_io.list_samples(root, a.calib_list), "calibration")
    subsets = {"one member x 2 views": [0]}
    if len(members) > 1:
        subsets[f"{len(members)} members x 2 views"] = list(range(len(members)))
    result = {"samples": len(held), "calibration_samples": len(calib), "subsets": {}}
    for label, use in subsets.items():
        calibration = fit_depth_calibration(calib, use)
        result["subsets"][label] = evaluate(held, use, calibration)
        for name, s in result["subsets"][label].items():
            rho = s["spearman_score_mape"]
            rho = "  n/a " if rho is None else f"{rho:+.3f}"
            print(
                f"{label:>22} | {name:>24} | Spearman {rho} | top decile "
                f"{s['top_decile_ratio']:.2f}x | mean score {s['mean_score']:.4f}"
            )
    if a.devito:
        droot = pathlib.Path(a.devito).expanduser()
        dids = data_io.list_samples(droot)
        dev = collect(run, droot, dids, "devito")
        use = list(range(len(members)))
        calibration = fit_depth_calibration(calib, use)
        name = "scale+spread" if members[0].cfg.model.error_head else "spread"
        rows = {}
        for tag, samples in (("devito", dev), ("generator", {i: held[i] for i in dids})):
            r = evaluate(samples, use, calibration)
            rows[tag] = {k: r[k]["mean_score"] for k in r} | {"mape": r[name]["mean_mape"]}
        result["devito"] = {"ids": dids, "map": name, **rows}
        print(
            f"devito-made vs generator-made, the same {len(dids)} velocity models: mean score "
            f"({name}) {rows['devito'][name]:.4f} vs {rows['generator'][name]:.4f}; MAPE "
            f"{rows['devito']['mape']:.4f} vs {rows['generator']['mape']:.4f}"
        )
    pathlib.Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
