"""scripts/gpu_bench.py --smoke: every section of the GPU benchmark runs on the CPU with tiny
shapes, so the one command a GPU renter runs cannot rot between GPU runs."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SECTIONS = ("env", "parity", "train", "infer", "synth", "projection")
TITLES = {
    "env": "1. Environment",
    "parity": "2. Parity of the forward pass",
    "train": "3. Training",
    "infer": "4. Inference",
    "synth": "5. Synthesis",
    "projection": "6. Projection",
}


@pytest.mark.full
def test_smoke_runs_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_bench.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    for name in SECTIONS:  # each section's heading names the platform, then its table
        heading = next(
            (line for line in p.stdout.splitlines() if line.startswith(f"## {TITLES[name]}")), None
        )
        assert heading is not None, (name, p.stdout[-3000:])
        assert "(cpu;" in heading, heading
    assert "| base_s6 | ours |" in p.stdout
    assert "| all 22 | 22 |" in p.stdout
    rec = json.loads(out.read_text())
    assert rec["mode"] == "smoke"
    assert rec["env"]["platform"] == "cpu"
    for name in SECTIONS:
        assert name in rec and name in rec["wall_s"], name
    assert not any("error" in r for r in rec["train"]), rec["train"]
    assert not any("error" in r for r in rec["parity"]), rec["parity"]
    assert "error" not in rec["infer"], rec["infer"]
    assert not any("error" in r for r in rec["synth"]), rec["synth"]
    # the same weights on both sides: float32 agrees to rounding
    assert max(r["float32"] for r in rec["parity"]) < 1e-4
