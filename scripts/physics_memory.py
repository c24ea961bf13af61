"""Memory of the refinement gradient at full size: XLA's analysis of the compiled program.

    python scripts/physics_memory.py [--profile cpml8|devito] [--mode full] [--block 100]
        [--no-remat | --adjoint] [--run N]

Lowers and compiles jax.grad of the relative misfit of one (300, 1259) model against five shots
of 10,001 samples (``fwi_jax.physics.Forward``; the devito profile's solver holds 4.5 km/s, the
refinement's default bound, and follows the recipe's clock of a 2.5 km/s model) and prints XLA's
memory analysis (arguments, outputs, temporaries); ``--run N`` also runs it N times and prints
the seconds (their median: the cost of one refinement iteration).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fwi_jax import physics


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="cpml8", choices=("cpml8", "devito"))
    ap.add_argument("--mode", default="full", choices=("fast", "full"))
    ap.add_argument("--block", type=int, default=100)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--run", type=int, default=0, metavar="N", help="also run it N times")
    ap.add_argument("--adjoint", action="store_true", help="the adjoint-state gradient")
    args = ap.parse_args()
    fwd = physics.Forward(profile=args.profile, mode_name=args.mode, block=args.block)
    v = jnp.full((300, 1259), 2.5, jnp.float32)
    obs = jnp.zeros((5, fwd.n_t, 31), jnp.float32)
    clock = jnp.asarray(fwd.clock(np.asarray(v)))

    def loss(v):
        sim = fwd.traces(v, clock, remat=not (args.no_remat or args.adjoint), adjoint=args.adjoint)
        return jnp.sum((sim - obs) ** 2)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(v).compile()
    print(
        f"{args.profile} mode {args.mode} ({fwd.mode.dx:g} m grid, "
        f"step {fwd.mode.dt * 1e3:.3f} ms), block {args.block}, "
        f"remat {not (args.no_remat or args.adjoint)}, adjoint {args.adjoint}, {fwd.n_t} output "
        "samples; "
        f"compiled in {time.perf_counter() - t0:.1f} s"
    )
    m = compiled.memory_analysis()
    gib = 2.0**30
    print(
        f"arguments {m.argument_size_in_bytes / gib:.3f} GiB, outputs "
        f"{m.output_size_in_bytes / gib:.3f} GiB, "
        f"temporaries {m.temp_size_in_bytes / gib:.3f} GiB, generated code "
        f"{m.generated_code_size_in_bytes / gib:.4f} GiB"
    )
    times = []
    for _ in range(args.run):
        t0 = time.perf_counter()
        g = np.asarray(compiled(v))
        times.append(time.perf_counter() - t0)
    if times:
        print(
            f"one gradient (5 shots): median {np.median(times):.1f} s of "
            f"{' '.join(f'{t:.1f}' for t in times)}; |g| max {np.abs(g).max():.3g}"
        )


if __name__ == "__main__":
    main()
