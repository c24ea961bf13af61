"""Packed store: a folder dataset as one memory-mapped .npy array per field, for fast reading.

    OUT/x.npy       (N, 6, 10000, 31) float32 or float16: `io.read_sample`'s x (x1e4, zero channel)
    OUT/v.npy       (N, 1259, 300) float32 km/s (depth, x); only when the samples have velocities
    OUT/ids.txt     N sample ids, one per line, row order of x.npy / v.npy
    OUT/index.json  format version, n, dtype, shapes, has_velocity, v_range checked and v min/max,
                    time_resample (how 10001 time samples became 10000)

`pack` validates every sample through `io.read_sample` and writes atomically (into
``OUT.tmp-<pid>``, renamed to OUT at the end; a failed pack leaves no OUT). `PackedSource` is
the grain data source over a store (``pipeline.make_loader`` picks it when ``root`` holds an
index.json). Arrays are read with ``allow_pickle=False`` only. CLI: ``python -m fwi_jax.data pack``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np

from fwi_jax.data import io

FORMAT = "fwi_jax.packed"
VERSION = 1
X_FILE = "x.npy"
V_FILE = "v.npy"
X_SHAPE = (6, io.N_TIME_RAW - 1, io.N_RECEIVERS)  # per sample, as `io.read_sample` returns it
V_SHAPE = io.VELOCITY_FILE_SHAPE[::-1]  # (depth, x)
DTYPES = ("float32", "float16")
FLOAT16_MAX = float(np.finfo(np.float16).max)


_CHUNK = 1 << 18  # values per step of `half_to_float32` (1 MB of output, stays in cache)
# sign, then exponent and mantissa shifted into float32 place
_MASK = np.uint32(0x8FFFE000).view(np.int32)
_REBIAS = np.float32(2.0**112)  # 2^(127 - 15)


def half_to_float32(src: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 array (any shape; a memmap slice is fine) -> float32 ``out``, bit-identical to
    ``src.astype(np.float32)`` for every finite value (zeros, subnormals included; packed stores
    hold finite values only), and several times faster than NumPy's scalar cast: the int16 bits,
    sign-extended and shifted left by 13, masked, are a float32 that one multiply by 2^112 rebiases,
    in chunks that stay in cache. Inf/NaN would come out as large finite numbers."""
    if out is None:
        out = np.empty(src.shape, np.float32)
    if out.dtype != np.float32 or out.shape != src.shape or not out.flags.c_contiguous:
        raise ValueError(f"out: {out.dtype} {out.shape}, need C-contiguous float32 {src.shape}")
    h = np.ascontiguousarray(src).reshape(-1).view(np.int16)
    o = out.reshape(-1)
    oi = o.view(np.int32)
    for a in range(0, h.size, _CHUNK):
        b = a + _CHUNK
        np.left_shift(h[a:b], 13, out=oi[a:b], dtype=np.int32)
        np.bitwise_and(oi[a:b], _MASK, out=oi[a:b])
        np.multiply(o[a:b], _REBIAS, out=o[a:b])
    return out


FLIP = "_flip"  # element key set by `pipeline.RandomFlip(defer=True)`: flip while batching


def _put_x(
    src: np.ndarray, dst: np.ndarray, flip: bool, scratch: np.ndarray | None, channels: bool = True
) -> None:
    """One sample's x (6, T, R) -> ``dst``, mirrored (`preprocess.flip`: channels and receivers
    reversed; receivers only with ``channels=False``) when ``flip``. ``dst`` float32 with a
    float16 ``src``: converted on the way
    (`half_to_float32`; ``scratch`` (T, R) float32 holds one channel); otherwise ``dst`` has the
    dtype of ``src`` and this is a plain copy."""
    convert = src.dtype == np.float16 and dst.dtype == np.float32
    if not flip:
        if convert:
            half_to_float32(src, dst)
        else:
            np.copyto(dst, src)
        return
    n = src.shape[0]
    for c in range(n):
        ch = src[n - 1 - c] if channels else src[c]
        if convert:
            ch = half_to_float32(ch, scratch)
        np.copyto(dst[c].T, ch[:, ::-1].T)  # iterating over time inside: faster than row-wise


def _put_mirrored(src: np.ndarray, dst: np.ndarray, scratch: np.ndarray) -> None:
    """``dst[...] = src[..., ::-1]`` for 2-D C-contiguous ``dst`` and ``scratch`` of src's shape and
    dtype, faster than NumPy's strided copy for float32 rows of 300: the flat array reversed
    (both axes) into ``scratch``, then its rows back in order, each row one memmove."""
    if src.ndim != 2 or not (dst.flags.c_contiguous and scratch.flags.c_contiguous):
        np.copyto(dst, src[..., ::-1])
        return
    np.copyto(scratch.reshape(-1), np.ascontiguousarray(src).reshape(-1)[::-1])
    row = np.dtype((np.void, src.shape[1] * src.dtype.itemsize))
    np.copyto(dst.view(row).reshape(-1), scratch.view(row).reshape(-1)[::-1])


class _BufferPool:
    """Batch arrays, handed out again once nothing but the pool references them (CPython reference
    counts). A fresh ``np.empty`` of tens of MB is new memory: page faults and kernel zeroing on
    every batch, system time that a reused array does not cost. Whoever holds a batch, a view of it,
    or a JAX array made from it (JAX keeps the NumPy array it reads alive) keeps it from reuse. At
    most ``size`` arrays are kept; thread-safe."""

    def __init__(self, size: int):
        self.size = int(size)
        self._arrays: list[np.ndarray] = []
        self._lock = threading.Lock()

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        shape, dtype = tuple(shape), np.dtype(dtype)
        with self._lock:
            free = [i for i in range(len(self._arrays)) if _unreferenced(self._arrays, i)]
            for i in free:
                if self._arrays[i].shape == shape and self._arrays[i].dtype == dtype:
                    return self._arrays[i]
            out = np.empty(shape, dtype)
            if len(self._arrays) >= self.size and free:
                del self._arrays[free[0]]  # a free array of another shape (a short last batch)
            if len(self._arrays) < self.size:
                self._arrays.append(out)
            return out

    def __getstate__(self):
        return {"size": self.size}

    def __setstate__(self, state):
        self.__init__(state["size"])


def _unreferenced(arrays: list, i: int) -> bool:
    """True when the list holds the only reference to arrays[i] (getrefcount adds its argument)."""
    return sys.getrefcount(arrays[i]) == 2


class StackBatch:
    """grain batch function for dict elements {"x", "v"?, "id", FLIP?}: the result equals grain's
    default batching of the same elements after `pipeline.RandomFlip`, but each sample is copied
    once, straight into the batch, a deferred flip applied on the way. ``x_float32=True``: x in
    float32 (float16 converted on the way, `half_to_float32`); False: x in the dtype it comes in
    (float16 from a float16 store, a plain copy). After ``enable_shared_memory_output()``
    (`pipeline.make_loader` calls it when it starts worker processes) x and v are written into
    grain's shared memory, which the workers hand to the main process without another copy.
    Otherwise, with ``reuse`` > 0, the arrays of up to ``reuse`` batches are recycled once the
    consumer has let go of them (`_BufferPool`), instead of new memory for every batch."""

    def __init__(self, x_float32: bool = True, reuse: int = 0, flip_channels: bool = True):
        """``flip_channels``: the config's flip (``geometry.flip_channels``)."""
        self.x_float32 = bool(x_float32)
        self.flip_channels = bool(flip_channels)
        self._shared = False
        self._pool = _BufferPool(2 * reuse) if reuse > 0 else None  # x and v of each batch

    def enable_shared_memory_output(self) -> None:
        self._shared = True

    def _empty(self, shape, dtype) -> np.ndarray:
        if self._shared:
            from grain.multiprocessing import SharedMemoryArray

            return SharedMemoryArray(shape, dtype=dtype)
        if self._pool is not None:
            return self._pool.empty(shape, dtype)
        return np.empty(shape, dtype)

    def __call__(self, elements: Sequence[dict]) -> dict:
        flips = [bool(e.get(FLIP, False)) for e in elements]
        batch = {}
        for key in elements[0]:
            if key == FLIP:
                continue
            parts = [e[key] for e in elements]
            if key == "x":
                dtype = np.float32 if self.x_float32 else parts[0].dtype
                out = self._empty((len(parts), *parts[0].shape), dtype)
                scratch = (
                    np.empty(parts[0].shape[1:], np.float32) if dtype != parts[0].dtype else None
                )
                for j, (part, flip) in enumerate(zip(parts, flips)):
                    _put_x(part, out[j], flip, scratch, self.flip_channels)
            elif key == "v":
                out = self._empty((len(parts), *parts[0].shape), parts[0].dtype)
                scratch = np.empty(parts[0].shape, parts[0].dtype) if any(flips) else None
                for j, (part, flip) in enumerate(zip(parts, flips)):
                    if flip:
                        _put_mirrored(part, out[j], scratch)
                    else:
                        np.copyto(out[j], part)
            else:
                out = np.stack(parts)
            batch[key] = out
        return batch


def pack(
    src,
    out,
    ids: Sequence[str] | None = None,
    *,
    dtype: str = "float32",
    v_range: tuple[float, float] = (0.5, 10.0),
    progress: bool = True,
    time_resample: str = "drop_last",
) -> dict:
    """Pack sample folders ``src/<id>`` (default: every sub-folder) into the store ``out``.

    ``dtype`` of x: "float32" (bit-exact) or "float16" (half the size; x values beyond float16's
    range are an error). Velocities must be present in every sample or in none. Returns the
    index dict. ``time_resample``: how 10001 time samples become 10000 (`io.read_sample`),
    recorded in the index; a config must ask for the same to read the store. Raises `io.DataError`
    naming the bad file; ``out`` must not exist yet."""
    src, out = pathlib.Path(src).expanduser(), pathlib.Path(out).expanduser()
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    ids = io.list_samples(src) if ids is None else list(ids)
    if not ids:
        raise io.DataError(f"{src}: no samples to pack")
    if len(set(ids)) != len(ids):
        raise io.DataError(f"{src}: {len(ids) - len(set(ids))} duplicate id(s)")
    if out.exists():
        raise FileExistsError(f"{out}: already exists (a packed store is never overwritten)")
    n = len(ids)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sample_id = ids[0]
    try:
        xs = np.lib.format.open_memmap(
            tmp / X_FILE, mode="w+", dtype=np.dtype(dtype), shape=(n, *X_SHAPE)
        )
        vs = None
        has_velocity = None
        vmin, vmax = np.inf, -np.inf
        it = ids
        if progress:
            from tqdm import tqdm

            it = tqdm(ids, desc=f"pack {dtype}", unit="sample", dynamic_ncols=True)
        for i, sample_id in enumerate(it):
            folder = src / sample_id
            x, v = io.read_sample(
                folder,
                v_range=v_range,
                require_velocity=has_velocity,
                time_resample=time_resample,
            )
            if has_velocity is None:
                has_velocity = v is not None
                if has_velocity:
                    vs = np.lib.format.open_memmap(
                        tmp / V_FILE, mode="w+", dtype=np.float32, shape=(n, *V_SHAPE)
                    )
            elif v is not None and not has_velocity:
                raise io.DataError(
                    f"{folder / io.VELOCITY_FILE}: present, but {ids[0]} has none "
                    f"(a packed store has velocities for every sample or none)"
                )
            if dtype == "float16":
                peak = float(np.abs(x).max())
                if peak > FLOAT16_MAX:
                    raise io.DataError(
                        f"{folder}: |x| up to {peak:.4g} after x1e4 overflows float16 "
                        f"(max {FLOAT16_MAX:.0f}); pack as float32"
                    )
            xs[i] = x
            if has_velocity:
                vs[i] = v
                vmin, vmax = min(vmin, float(v.min())), max(vmax, float(v.max()))
        index = {
            "format": FORMAT,
            "version": VERSION,
            "n": n,
            "dtype": dtype,
            "x_shape": [n, *X_SHAPE],
            "v_shape": [n, *V_SHAPE] if has_velocity else None,
            "has_velocity": bool(has_velocity),
            "v_range": list(map(float, v_range)),
            "v_min": vmin if has_velocity else None,
            "v_max": vmax if has_velocity else None,
            "time_resample": time_resample,
        }
        for a in (xs, vs):
            if a is not None:
                a.flush()
        del xs, vs
        (tmp / io.STORE_IDS_FILE).write_text("".join(f"{i}\n" for i in ids))
        (tmp / io.STORE_INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, io.DataError) and isinstance(e, Exception):
            e.add_note(f"while packing sample {sample_id!r} ({src / sample_id}); {out} not written")
        raise
    return index


def read_index(root) -> dict:
    """index.json of a store, checked against its format, version and files."""
    root = pathlib.Path(root)
    path = root / io.STORE_INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise io.DataError(f"{path}: not a readable packed-store index ({e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise io.DataError(f"{path}: not a {FORMAT} index")
    if index.get("version") != VERSION:
        raise io.DataError(
            f"{path}: format version {index.get('version')}, this code reads {VERSION}"
        )
    if index.get("dtype") not in DTYPES:
        raise io.DataError(f"{path}: dtype {index.get('dtype')!r} not one of {DTYPES}")
    return index


def _open(path: pathlib.Path, shape, dtype) -> np.ndarray:
    """Memory-map one store array read-only (never unpickling) and check shape and dtype."""
    try:
        with io.NPY_HEADER_LOCK:  # np.load parses the header with ast, not thread-safe in 3.11
            a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise io.DataError(f"{path}: not a readable .npy file ({e})") from e
    if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise io.DataError(
            f"{path}: {a.dtype} {a.shape}, index says {np.dtype(dtype)} {tuple(shape)}"
        )
    return a


class PackedSource(grain.sources.RandomAccessDataSource):
    """Random access to a packed store: element i is {"x" float32, "v", "id"} of ids[i], the same
    arrays `FolderSource` gives for the folders the store was packed from (float16 stores: x
    rounded to float16, returned as float32).

    ``raw=True``: x and v are read-only views of the store (x float16 for float16 stores), copied
    only by batching (`StackBatch`, which converts float16 when asked): what
    `pipeline.make_dataset` uses.
    The memmaps open lazily in each process; pickles without them, so grain workers rebuild it."""

    def __init__(
        self,
        root,
        ids: Sequence[str] | None = None,
        *,
        v_range=(0.5, 10.0),
        require_velocity: bool | None = None,
        raw: bool = False,
    ):
        self.root = str(root)
        self.raw = bool(raw)
        self.index = read_index(self.root)
        stored = io.read_store_ids(self.root)
        if len(stored) != self.index["n"]:
            raise io.DataError(
                f"{pathlib.Path(self.root) / io.STORE_IDS_FILE}: {len(stored)} ids, index says "
                f"{self.index['n']}"
            )
        row_of = {i: r for r, i in enumerate(stored)}
        self.ids = list(stored if ids is None else ids)
        missing = [i for i in self.ids if i not in row_of]
        if missing:
            raise io.DataError(
                f"{self.root}: {len(missing)} requested id(s) not in the packed store, "
                f"e.g. {', '.join(missing[:5])}"
            )
        self.rows = np.asarray([row_of[i] for i in self.ids], dtype=np.int64)
        if require_velocity and not self.index["has_velocity"]:
            raise io.DataError(
                f"{pathlib.Path(self.root) / V_FILE}: missing file (store packed without "
                "velocities)"
            )
        lo, hi = map(float, v_range)
        # the store was validated against its own v_range; check again per sample only if needed
        self.v_range = (lo, hi)
        self._check_v = self.index["has_velocity"] and not (
            lo <= self.index["v_min"] and self.index["v_max"] <= hi
        )
        self._mm = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(x, v or None) memmaps, opened on first use in this process (reader threads may race
        here; each then opens its own pair, both valid, and one is kept)."""
        if self._mm is None:
            root, ix = pathlib.Path(self.root), self.index
            x = _open(root / X_FILE, ix["x_shape"], ix["dtype"])
            v = _open(root / V_FILE, ix["v_shape"], np.float32) if ix["has_velocity"] else None
            self._mm = (x, v)
        return self._mm

    def check(self) -> list[tuple[str, str]]:
        """Check before use: open x.npy / v.npy (shapes and dtypes against the index; raises
        `io.DataError`), then, only when ``v_range`` is narrower than the range the store was
        validated against at packing, every sample's velocities. Returns [(id, message)] of the
        samples outside ``v_range``."""
        _, vs = self._arrays()
        if not self._check_v:
            return []
        lo, hi = self.v_range
        bad = []
        for sample_id, row in zip(self.ids, self.rows):
            vmin, vmax = float(vs[row].min()), float(vs[row].max())
            if vmin < lo or vmax > hi:
                bad.append(
                    (
                        sample_id,
                        f"{pathlib.Path(self.root) / V_FILE}: velocities in [{vmin:.4g}, "
                        f"{vmax:.4g}] "
                        f"km/s, outside the allowed range [{lo}, {hi}] km/s",
                    )
                )
        return bad

    def __getstate__(self):
        return {**self.__dict__, "_mm": None}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        xs, vs = self._arrays()
        row = int(self.rows[index])
        x = np.asarray(xs[row])  # a view of the memmap, plain ndarray
        if not self.raw:
            x = half_to_float32(x) if x.dtype == np.float16 else x.copy()
        element = {"x": x, "id": np.asarray(self.ids[index])}
        if vs is not None:
            v = np.asarray(vs[row]) if self.raw else np.array(vs[row])
            if self._check_v:
                vmin, vmax = float(v.min()), float(v.max())
                if vmin < self.v_range[0] or vmax > self.v_range[1]:
                    raise io.DataError(
                        f"{self.root}: sample {self.ids[index]}: velocities in [{vmin:.4g}, "
                        f"{vmax:.4g}] km/s, outside the allowed range "
                        f"[{self.v_range[0]}, {self.v_range[1]}] km/s"
                    )
            element["v"] = v
        return element

    def __repr__(self) -> str:
        return f"PackedSource(root={self.root!r}, n={len(self.ids)}, dtype={self.index['dtype']})"
