"""Input-pipeline throughput: samples/s of `make_loader` over sample folders and over packed
stores (float32; float16 converted to float32 on the host, ``data.host_dtype=float32``; float16
handed over as float16, ``data.host_dtype=store``, the default, cast on the device by the jitted
programs), with 0, 1 and 2 grain worker processes.

Writes its own competition-format dataset (``--n`` samples of random float32 arrays of the real
shapes: five (10001, 31) shots, vp (300, 1259)) into ``--dir`` or a temporary folder, packs it
with `fwi_jax.data.pack.pack`, warms the page cache with one untimed pass, then times
``--epochs`` training epochs (shuffle, flip p = cfg.data.flip_p, batch ``--batch``) per
configuration (``--repeats`` runs, median in the table). Also times `io.read_sample` alone (one
process, one thread). Ends with a Markdown table.

    python scripts/bench_loader.py [--n 64] [--batch 8] [--epochs 3] [--workers 0 1 2] [--prefetch
    P]
                                   [--repeats 3] [--cycle M] [--dir D]

Worker processes hand batches over in /dev/shm (grain's shared memory): every batch is written
into new shared memory, a page fault per 4 KiB, and unlinked after use; on a small VM they are far
slower than reading in threads (0 workers), where batch arrays are recycled.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

from fwi_jax.config import Config
from fwi_jax.data import io, pack
from fwi_jax.data.pipeline import make_loader


def write_dataset(root: pathlib.Path, n: int, seed: int = 0) -> list[str]:
    """n sample folders of random float32 data of the competition shapes; returns their ids."""
    rng = np.random.default_rng(seed)
    ids = [f"bench_{i:05d}" for i in range(n)]
    for sample_id in ids:
        d = root / sample_id
        d.mkdir(parents=True, exist_ok=True)
        for name in io.SHOT_FILES:
            np.save(
                d / name,
                rng.standard_normal((io.N_TIME_RAW, io.N_RECEIVERS), dtype=np.float32) * 1e-4,
            )
        np.save(
            d / io.VELOCITY_FILE, rng.uniform(1.5, 4.5, io.VELOCITY_FILE_SHAPE).astype(np.float32)
        )
    return ids


CPU_MS: dict = {}  # (root, host dtype, workers) -> CPU ms of this process per sample, last run


def time_loader(cfg, root, ids, *, workers: int, batch: int, epochs: int) -> float:
    """Samples/s over ``epochs`` training epochs (after one untimed warm-up batch); also records
    this process's CPU time per sample in CPU_MS (with 0 workers: all of the loader's work)."""
    it = iter(
        make_loader(
            cfg,
            root,
            ids,
            train=True,
            batch_size=batch,
            seed=0,
            num_epochs=epochs + 1,
            workers=workers,
            process_index=0,
            process_count=1,
        )
    )
    try:
        next(it)  # start-up (worker processes, first reads) not timed
        n = 0
        t, c = time.perf_counter(), time.process_time()
        for b in it:
            n += len(b["id"])
        CPU_MS[str(root), cfg.data.host_dtype, workers] = 1e3 * (time.process_time() - c) / n
        return n / (time.perf_counter() - t)
    finally:
        if hasattr(it, "close"):
            it.close()


def time_read_sample(root, ids, repeats: int = 2) -> float:
    t = time.perf_counter()
    for _ in range(repeats):
        for sample_id in ids:
            io.read_sample(root / sample_id)
    return repeats * len(ids) / (time.perf_counter() - t)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=64, help="samples to write (default 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs per configuration; the table shows the median",
    )
    parser.add_argument(
        "--cycle",
        type=int,
        default=0,
        metavar="M",
        help="loader id list = the n ids cycled to M entries (an epoch of M samples, e.g. the "
        "real 4599); default: off",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=None,
        help="cfg.data.prefetch: reader threads and batches buffered (default: the config's)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="time only the sources whose name contains one of these (e.g. 'float16 batches')",
    )
    parser.add_argument(
        "--dir", default=None, help="work folder (default: a temporary one, removed after)"
    )
    args = parser.parse_args(argv)

    work = (
        pathlib.Path(args.dir)
        if args.dir
        else pathlib.Path(tempfile.mkdtemp(prefix="bench_loader_"))
    )
    try:
        folders = work / "folders"
        if folders.is_dir() and len(io.list_samples(folders)) == args.n:
            ids = io.list_samples(folders)
        else:
            shutil.rmtree(folders, ignore_errors=True)
            t = time.perf_counter()
            ids = write_dataset(folders, args.n)
            print(
                f"wrote {args.n} samples to {folders} in {time.perf_counter() - t:.1f} s",
                flush=True,
            )
        stores = {}
        for dtype in ("float32", "float16"):
            out = work / f"packed_{dtype}_{args.n}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            pack.pack(folders, out, ids, dtype=dtype, progress=False)
            print(f"packed {dtype}: {time.perf_counter() - t:.1f} s", flush=True)
            stores[dtype] = out
        rs = time_read_sample(folders, ids)  # also warms the page cache for the folders
        print(f"io.read_sample alone: {rs:.0f} samples/s", flush=True)

        loader_ids = (ids * -(-args.cycle // len(ids)))[: args.cycle] if args.cycle else ids
        cfg = Config()
        if args.prefetch is not None:
            cfg = cfg.replace(**{"data.prefetch": args.prefetch})
        host32 = cfg.replace(**{"data.host_dtype": "float32"})
        sources = {  # name: (root, config); x of float32 stores and folders is float32 either way
            "folders": (folders, cfg),
            "packed float32": (stores["float32"], cfg),
            "packed float16, host-converted to float32 batches": (stores["float16"], host32),
            "packed float16, float16 batches": (stores["float16"], cfg),
        }
        if args.only:
            sources = {k: v for k, v in sources.items() if any(o in k for o in args.only)}
        results, cpu = {}, {}
        load0 = os.getloadavg()[0]
        for name, (root, c) in sources.items():
            # warm page cache
            time_loader(c, root, loader_ids, workers=0, batch=args.batch, epochs=1)
            for w in args.workers:
                runs = [
                    time_loader(
                        c, root, loader_ids, workers=w, batch=args.batch, epochs=args.epochs
                    )
                    for _ in range(args.repeats)
                ]
                results[name, w] = float(np.median(runs))
                cpu[name, w] = CPU_MS[str(root), c.data.host_dtype, w]
                print(
                    f"{name:50s} workers={w}: median {results[name, w]:5.0f} samples/s "
                    f"(runs: {', '.join(f'{r:.0f}' for r in runs)}; {cpu[name, w]:.2f} CPU "
                    "ms/sample in "
                    f"this process)",
                    flush=True,
                )

        print()
        print(
            f"make_loader, train (shuffle, flip p={cfg.data.flip_p}), batch {args.batch}, "
            f"{args.n} samples"
            f"{f' cycled to epochs of {len(loader_ids)}' if args.cycle else ''}, "
            f"{args.epochs} epochs, prefetch {cfg.data.prefetch}, warm page cache, median of "
            f"{args.repeats} runs; "
            f"{os.cpu_count()} CPU cores, "
            f"{platform.processor() or platform.machine()}, Python {sys.version.split()[0]}, "
            f"numpy {np.__version__}. `io.read_sample` alone: {rs:.0f} samples/s. 1-minute load "
            "average "
            f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs on the "
            "machine lower "
            f"the figures)."
        )
        print()
        cpu_col = 0 in args.workers
        print(
            "| source | "
            + " | ".join(f"{w} workers" for w in args.workers)
            + (" | CPU ms/sample, 0 workers |" if cpu_col else " |")
        )
        print("|---|" + "---:|" * (len(args.workers) + cpu_col))
        for name in sources:
            print(
                f"| {name} | "
                + " | ".join(f"{results[name, w]:.0f}" for w in args.workers)
                + (f" | {cpu[name, 0]:.2f} |" if cpu_col else " |")
            )
        print(
            "\nsamples/s; one sample = x (6, 10000, 31) float32 + v (1259, 300) float32 = 8.9 MB "
            "(float16 batches: x 3.7 MB, 5.2 MB in all); 0 workers = reading in cfg.data.prefetch "
            "threads "
            "of the main process; CPU ms/sample = this process's CPU time (user + system) per "
            "sample with 0 "
            "workers, all of the loader's work: cores / that is the CPU-bound ceiling (other jobs "
            "inflate it "
            "too, by sharing caches and memory bandwidth)"
        )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
