"""``python -m fwi_jax.infer`` of this tree against another revision's, alternating, in one run.

    python scripts/bench_infer_ab.py --baseline REV [--config demo] [--members 2] [--samples 6]
        [--repeats 3] [-- extra infer flags]

Exports the package at git revision REV (``git archive``) into a temporary folder, writes
``--samples`` + 1 random samples as shot files and ``--members`` random members of ``--config``
(saved by the baseline's code, so that both read them), then runs the same inference command
``--repeats`` times with each package, alternating (baseline, this tree, baseline, ...), and
prints each run's rate after the first batch (compile excluded, as infer prints it) and the
medians. Extra flags after ``--`` go to this tree's runs only (``-- --uncertainty``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        base = tmp / "baseline"
        base.mkdir()
        archive = subprocess.run(
            ["git", "archive", a.baseline, "fwi_jax", "configs"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        make = f"""
import numpy as np, pathlib
from fwi_jax.checkpoint import save_params
from fwi_jax.config import load_config
from fwi_jax.model import create_model
from fwi_jax.preprocess import SOURCE_POSITIONS
tmp = pathlib.Path({str(tmp)!r})
cfg = load_config({a.config!r})
for k in range({a.members}):
    save_params(tmp / f"m{{k}}", create_model(cfg, k)[1], cfg)
rng = np.random.default_rng(0)
for i in range({a.samples} + 1):
    d = tmp / "data" / f"s{{i}}"
    d.mkdir(parents=True)
    for p in SOURCE_POSITIONS:
        np.save(d / f"receiver_data_src_{{p}}.npy",
                (1e-3 * rng.standard_normal((10001, 31))).astype(np.float32))
"""
        env = dict(os.environ, PYTHONPATH=str(base))
        # run from the temporary folder: python -c puts its working folder first on sys.path
        subprocess.run([sys.executable, "-c", make], env=env, check=True, cwd=tmp)
        members = [str(tmp / f"m{k}") for k in range(a.members)]
        rates: dict[str, list[float]] = {"baseline": [], "this tree": []}
        for r in range(a.repeats):
            for label, path, flags in (
                ("baseline", base, []),
                ("this tree", ROOT, extra),
            ):
                cmd = [sys.executable, "-m", "fwi_jax.infer", "--data", str(tmp / "data")]
                cmd += ["--checkpoints", *members, "--out", str(tmp / "sub.npz"), "--no-progress"]
                proc = subprocess.run(
                    cmd + flags,
                    env=dict(os.environ, PYTHONPATH=str(path)),
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                )
                if proc.returncode:
                    sys.exit(f"{label}: {proc.stderr}")
                m = re.search(
                    r"after the first batch: \d+ samples in [\d.]+ s \(([\d.]+)", proc.stdout
                )
                rates[label].append(float(m.group(1)))
                print(f"run {r + 1} {label}: {rates[label][-1]:.3f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"median of {a.repeats}: baseline {med['baseline']:.3f}, this tree {med['this tree']:.3f} "
        f"samples/s ({med['this tree'] / med['baseline']:.3f}x)"
        + (f", this tree with {' '.join(extra)}" if extra else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
