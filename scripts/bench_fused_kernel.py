"""Single-thread timing of the fused CPU attention kernel's per-head work, in C++ (no JAX, no
threads): what `fused_cpu` costs per head and how close its products run to the machine's
peak. Compiles a small harness that includes fwi_jax/model/csrc/attention_cpu.cc with the
kernel's own flags, then times ForwardHead and BackwardHead over every head of tiny's attention
shape (6, 1,981, 3, 64), best of 3 passes, for each --blocks query block.

    .venv/bin/python scripts/bench_fused_kernel.py [--blocks 64 128 256] [--shape 6 1981 3 64]
        [--define FWI_KEY_CHUNK=256]

GFLOP/s count the matmuls only (forward 2, backward 5 of N x N x D per head). The whole kernel
on 2 threads (JAX, with PyTorch's attention beside it) is scripts/bench_attention.py.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import jax

from fwi_jax.model.fused_attention import SOURCE, compile_flags, find_compiler

HARNESS = r"""
#include "%(source)s"
#include <chrono>
#include <cstdio>
#include <cstdlib>
int main(int argc, char** argv) {
  const int64_t B = atol(argv[1]), N = atol(argv[2]), H = atol(argv[3]), D = atol(argv[4]);
  const int64_t ld = H * D;
  std::vector<float> q(B * N * ld), k(q.size()), v(q.size()), o(q.size()), g(q.size()),
      dq(q.size()), dk(q.size()), dv(q.size()), lse(B * H * N), dkh(N * D), dvh(N * D);
  unsigned state = 1;
  auto rnd = [&] {
    state = state * 1664525u + 1013904223u;
    return ((state >> 8) & 0xffff) / 65536.f - 0.5f;
  };
  for (size_t i = 0; i < q.size(); ++i) {
    q[i] = 4 * rnd(); k[i] = 4 * rnd(); v[i] = rnd(); g[i] = 0.01f * rnd();
  }
  for (int a = 5; a < argc; ++a) {
    const int64_t block = atol(argv[a]);
    Problem pr;
    if (MakeProblem(Shape{B, N, H, D}, block, &pr).failure()) {
      fprintf(stderr, "bad shape or block\n");
      return 1;
    }
    double fwd = 1e9, bwd = 1e9;
    for (int rep = 0; rep < 3; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      WithDimVectors(D, [&](auto nv) {
        for (int64_t bh = 0; bh < B * H; ++bh)
          ForwardHead<decltype(nv)::value>(pr, bh, 0, pr.n_blocks, q.data(), k.data(), v.data(),
                                           o.data(), lse.data());
      });
      auto t1 = std::chrono::steady_clock::now();
      WithDimVectors(D, [&](auto nv) {
        for (int64_t bh = 0; bh < B * H; ++bh) {
          BackwardHead<decltype(nv)::value>(pr, bh, 0, pr.n_blocks, q.data(), k.data(), v.data(),
                                            o.data(), lse.data(), g.data(), dq.data(), dkh.data(),
                                            dvh.data());
          Scatter(dkh.data(), N, D, ld, dk.data() + pr.s.head_offset(bh));
          Scatter(dvh.data(), N, D, ld, dv.data() + pr.s.head_offset(bh));
        }
      });
      auto t2 = std::chrono::steady_clock::now();
      fwd = std::min(fwd, std::chrono::duration<double>(t1 - t0).count() / (B * H));
      bwd = std::min(bwd, std::chrono::duration<double>(t2 - t1).count() / (B * H));
    }
    const double gf = 2.0 * N * N * D / 1e9;  // one N x N x D matmul
    printf("| %%ld | %%.2f | %%.0f | %%.2f | %%.0f |\n", (long)block, fwd * 1e3, 2 * gf / fwd,
           bwd * 1e3, 5 * gf / bwd);
  }
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--blocks", nargs="+", type=int, default=[64, 128, 256])
    ap.add_argument(
        "--define",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="preprocessor definitions for the build, e.g. FWI_KEY_CHUNK=256 (the backward's key "
        "chunk)",
    )
    ap.add_argument(
        "--shape", nargs=4, type=int, default=[6, 1981, 3, 64], metavar=("B", "N", "H", "D")
    )
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        harness, exe = Path(tmp) / "harness.cc", Path(tmp) / "harness"
        harness.write_text(HARNESS % {"source": SOURCE})
        flags = [f for f in compile_flags() if f not in ("-shared", "-fPIC")]
        cmd = [
            find_compiler(),
            *flags,
            f"-I{jax.ffi.include_dir()}",
            *(f"-D{d}" for d in a.define),
            str(harness),
            "-o",
            str(exe),
        ]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode:
            raise SystemExit(
                f"compiling the harness failed:\n$ {' '.join(cmd)}\n{built.stderr[-4000:]}"
            )
        print(
            f"fused_cpu kernel, one thread, shape {tuple(a.shape)} (B, N, H, D), per head, best "
            "of 3\n"
        )
        print("| query block | forward ms | forward GFLOP/s | backward ms | backward GFLOP/s |")
        print("|---:|---:|---:|---:|---:|", flush=True)
        subprocess.run([str(exe), *map(str, a.shape), *map(str, a.blocks)], check=True)


if __name__ == "__main__":
    main()
