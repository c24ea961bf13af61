"""Competition-format sample folders on host (reference §1-§2).

A sample folder holds five shot gathers ``receiver_data_src_{p}.npy`` float32 (10001, 31)
(time, receiver) for p in `SOURCE_POSITIONS`, and, for training/validation folders,
``vp_model.npy`` float32 (300, 1259) (x, depth) in km/s.

`read_sample` applies reference §2 steps 1-3 on the host (drop the last time sample, or
area-resample 10001 -> 10000 with ``time_resample="area"``; x1e4; insert the all-zero channel
151), so the device receives ready model input (6, 10000, 31) float32.
`list_samples` lists the samples of a folder dataset or of a packed store (``fwi_jax.data.pack``,
whose ids this module reads from its ``ids.txt``), the one listing every command uses.
"""

from __future__ import annotations

import io as _io
import pathlib
import threading
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fwi_jax.data.split import read_id_list
from fwi_jax.preprocess import (
    AMPLITUDE_SCALE,
    SOURCE_POSITIONS,
    ZERO_CHANNEL,
    resample_time,
    shots_to_input,
)
from fwi_jax.storage import write_atomic

N_TIME_RAW = 10001  # time samples per shot in the files
N_RECEIVERS = 31
VELOCITY_FILE_SHAPE = (300, 1259)  # (x, depth) as stored
SHOT_FILES = tuple(f"receiver_data_src_{p}.npy" for p in SOURCE_POSITIONS)
VELOCITY_FILE = "vp_model.npy"
STORE_INDEX_FILE = "index.json"  # a packed store's index (fwi_jax.data.pack)
STORE_IDS_FILE = "ids.txt"  # a packed store's ids, one per line, in row order


# np.lib.format parses .npy headers with ast.literal_eval, which CPython 3.11 does not make
# thread-safe ("AST constructor recursion depth mismatch" from grain's reader threads): parse
# under this lock, and remember parsed headers (every shot file of a dataset has the same one).
NPY_HEADER_LOCK = threading.Lock()
_headers: dict[bytes, tuple] = {}


class DataError(ValueError):
    """A sample file is missing or malformed; the message names the file and the problem."""


def _load_array(path: pathlib.Path, shape: tuple[int, ...]) -> np.ndarray:
    """Load one .npy (never unpickling) and check shape, float dtype and finiteness."""
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":  # np.load would otherwise try to read it as a pickle
        raise DataError(
            f"{path}: not a .npy file (no NumPy header; {len(magic)} leading bytes {magic!r})"
        )
    try:
        with NPY_HEADER_LOCK:  # see `_npy_header`
            a = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DataError(f"{path}: object array (pickled data is never loaded)") from e
        raise DataError(f"{path}: not a readable .npy file (truncated or corrupt: {e})") from e
    except (EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy file (truncated or corrupt: {e})") from e
    if not isinstance(a, np.ndarray):  # np.load returns an NpzFile for zip archives
        raise DataError(f"{path}: not a .npy array file (got {type(a).__name__})")
    if a.dtype.kind != "f":
        raise DataError(f"{path}: dtype {a.dtype} is not floating point")
    if a.shape != shape:
        raise DataError(f"{path}: shape {a.shape}, expected {shape}")
    finite = np.isfinite(a)
    if not finite.all():
        n_nan = int(np.isnan(a).sum())
        raise DataError(f"{path}: {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values")
    return a.astype(np.float32, copy=False)


_F32 = np.dtype("<f4")


def _npy_header(f) -> tuple | None:
    """(shape, fortran_order, dtype) of the open .npy file ``f``, positioned at the data after
    the call; None for anything but a well-formed version 1.0/2.0 header."""
    prefix = f.read(10)
    if len(prefix) != 10 or prefix[:6] != b"\x93NUMPY" or prefix[6] not in (1, 2):
        return None
    if prefix[6] == 2:
        prefix += f.read(2)
    header = prefix + f.read(int.from_bytes(prefix[8:], "little"))
    parsed = _headers.get(header)
    if parsed is None:
        with NPY_HEADER_LOCK:
            b = _io.BytesIO(header)
            version = np.lib.format.read_magic(b)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            parsed = read(b)
            if len(_headers) < 256:
                _headers[header] = parsed
    return parsed


def _read_f32_into(
    path: pathlib.Path, shape: tuple[int, ...], out: np.ndarray, tail: np.ndarray | None = None
) -> bool:
    """Fast path: read a little-endian float32 C-order .npy of ``shape`` straight into ``out``
    (its first out.size values; the rest, if any, into ``tail``) without intermediate copies.
    Returns False on anything unusual (missing, not .npy, other dtype/order/shape, short file);
    the caller then takes the validating slow path, which names the problem."""
    try:
        with open(path, "rb") as f:
            header = _npy_header(f)
            if header is None:
                return False
            fshape, fortran, dtype = header
            if fortran or dtype != _F32 or tuple(fshape) != shape:
                return False
            for buf in (out,) if tail is None else (out, tail):
                view = memoryview(buf.reshape(-1)).cast("B")
                if f.readinto(view) != view.nbytes:
                    return False
        return True
    except (OSError, ValueError, SyntaxError, TypeError):
        return False


def _read_shot(
    path: pathlib.Path, out: np.ndarray, tail: np.ndarray, time_resample: str = "drop_last"
) -> bool:
    """Fast path for one shot file: first 10000 time samples into ``out`` (10000, 31), the last
    into ``tail``; all finite (checked while in cache); with ``time_resample="area"`` ``out``
    becomes the area resample of all 10001; then ``out`` scaled x1e4 in place. False on anything
    unusual (the caller then takes the checked path)."""
    if not _read_f32_into(path, (N_TIME_RAW, N_RECEIVERS), out, tail):
        return False
    if not (np.isfinite(out).all() and np.isfinite(tail).all()):
        return False
    if time_resample != "drop_last":
        out[...] = resample_time(np.concatenate([out, tail]), time_resample)
    out *= np.float32(AMPLITUDE_SCALE)
    return True


def read_sample(
    folder,
    *,
    v_range: tuple[float, float] = (0.5, 10.0),
    require_velocity: bool | None = None,
    time_resample: str = "drop_last",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read and validate one sample folder.

    Returns (seismic (6, 10000, 31) float32 model input, reference §2 steps 1-3 applied on host;
    velocity (1259, 300) float32 km/s (depth, x), or None when vp_model.npy is absent).
    ``require_velocity``: True -> a missing vp_model.npy is an error; None/False -> optional.
    ``time_resample``: how 10001 time samples become 10000 (`preprocess.resample_time`).
    Raises `DataError` naming the file and what is wrong.

    Fast path for well-formed float32 files: each shot is read straight into its channel of the
    output, checked finite and scaled in place while in cache (bit-identical to `shots_to_input`).
    Any anomaly falls back to `_read_sample_checked`, so the validation and its messages are
    those of the checked path."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: sample folder does not exist")
    seismic = np.empty((len(SHOT_FILES) + 1, N_TIME_RAW - 1, N_RECEIVERS), np.float32)
    seismic[ZERO_CHANNEL] = 0.0
    tails = np.empty((len(SHOT_FILES), 1, N_RECEIVERS), np.float32)  # the dropped last time samples
    channels = [c for c in range(len(SHOT_FILES) + 1) if c != ZERO_CHANNEL]
    ok = all(
        _read_shot(folder / name, seismic[c], tails[k], time_resample)
        for k, (c, name) in enumerate(zip(channels, SHOT_FILES))
    )
    vp = None
    vpath = folder / VELOCITY_FILE
    if ok and vpath.exists():
        vp = np.empty(VELOCITY_FILE_SHAPE, np.float32)
        ok = _read_f32_into(vpath, VELOCITY_FILE_SHAPE, vp)
        if ok:
            vmin, vmax = float(vp.min()), float(vp.max())  # NaN propagates; +-Inf shows as min/max
            ok = (
                np.isfinite(vmin)
                and np.isfinite(vmax)
                and v_range[0] <= vmin
                and vmax <= v_range[1]
            )
    if not ok:
        return _read_sample_checked(
            folder, v_range=v_range, require_velocity=require_velocity, time_resample=time_resample
        )
    if vp is None:
        if require_velocity:
            raise DataError(f"{vpath}: missing file")
        return seismic, None
    return seismic, np.ascontiguousarray(vp.T)


def _read_sample_checked(
    folder: pathlib.Path,
    *,
    v_range: tuple[float, float],
    require_velocity: bool | None,
    time_resample: str = "drop_last",
) -> tuple[np.ndarray, np.ndarray | None]:
    """`read_sample` file by file through `_load_array`: any float dtype, every check, and the
    error message naming the first bad file."""
    shots = np.stack([_load_array(folder / name, (N_TIME_RAW, N_RECEIVERS)) for name in SHOT_FILES])
    seismic = shots_to_input(shots, time_resample)
    vpath = folder / VELOCITY_FILE
    if not vpath.exists():
        if require_velocity:
            raise DataError(f"{vpath}: missing file")
        return seismic, None
    vp = _load_array(vpath, VELOCITY_FILE_SHAPE)
    lo, hi = v_range
    vmin, vmax = float(vp.min()), float(vp.max())
    if vmin < lo or vmax > hi:
        raise DataError(
            f"{vpath}: velocities in [{vmin:.4g}, {vmax:.4g}] km/s, outside the allowed "
            f"range [{lo}, {hi}] km/s"
        )
    return seismic, np.ascontiguousarray(vp.T)


def is_packed(root) -> bool:
    """True when ``root`` is a packed store (holds index.json)."""
    return (pathlib.Path(root) / STORE_INDEX_FILE).is_file()


def read_store_ids(root) -> list[str]:
    """A packed store's ids, in row order (ids.txt)."""
    path = pathlib.Path(root) / STORE_IDS_FILE
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"{path}: cannot read the packed store's id list ({e})") from e


def list_samples(root, list_file=None) -> list[str]:
    """Sorted sample ids of a folder dataset (its non-hidden sub-folders) or a packed store (its
    ids): the lines of ``list_file`` (blank lines ignored), else every sample. Listed ids that
    ``root`` lacks, and a ``root`` without samples, are errors naming them."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder does not exist")
    packed = is_packed(root)
    if packed:
        stored = read_store_ids(root)
    else:
        stored = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not list_file:
        if not stored:
            raise DataError(f"{root}: no samples (no sample folders, or an empty packed store)")
        return sorted(stored)
    try:
        ids = read_id_list(list_file)
    except (OSError, ValueError) as e:  # no such file, duplicate ids
        raise DataError(str(e)) from None
    known = set(stored)
    missing = [i for i in ids if i not in known]
    if missing:
        where = f"are not in the packed store {root}" if packed else f"have no folder under {root}"
        raise DataError(
            f"{list_file}: {len(missing)} listed id(s) {where}, e.g. {', '.join(missing[:5])}"
        )
    return sorted(ids)


def check_dataset(
    root,
    ids: Iterable[str],
    *,
    v_range: tuple[float, float] = (0.5, 10.0),
    require_velocity: bool | None = None,
    progress: bool = False,
) -> list[tuple[str, str]]:
    """Validate every sample; returns [(id, message)] for each bad one (empty when all good)."""
    root = pathlib.Path(root)
    ids = list(ids)
    it = ids
    if progress:
        from tqdm import tqdm

        it = tqdm(ids, desc="check", unit="sample", dynamic_ncols=True)
    bad = []
    for sample_id in it:
        try:
            read_sample(root / sample_id, v_range=v_range, require_velocity=require_velocity)
        except DataError as e:
            bad.append((sample_id, str(e)))
    return bad


def write_submission(path, predictions: Mapping[str, np.ndarray]) -> None:
    """Write one .npz: key = sample id, value float64 (300, 1259) (x, depth) (reference §1).
    Atomic: written to a temporary file in the same folder, then renamed over ``path``."""
    path = pathlib.Path(path)
    arrays = {}
    for sample_id, pred in predictions.items():
        a = np.asarray(pred)
        if a.shape != VELOCITY_FILE_SHAPE:
            raise DataError(
                f"{path}: prediction for {sample_id!r} has shape {a.shape}, "
                f"expected {VELOCITY_FILE_SHAPE} (x, depth)"
            )
        arrays[str(sample_id)] = a.astype(np.float64)
    write_atomic(path, lambda f: np.savez(f, **arrays))


def read_submission(path) -> dict[str, np.ndarray]:
    """Read a submission .npz (never unpickling): {sample id: float32 (300, 1259) (x, depth) km/s}.
    Raises `DataError` naming the file and the first bad entry."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"{path}: submission file does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz submission ({e})") from None
    except AttributeError:  # np.load returned a plain array: a .npy, not a .npz
        raise DataError(f"{path}: not a .npz submission (a single array)") from None
    for sample_id, a in out.items():
        if a.shape != VELOCITY_FILE_SHAPE or not np.all(np.isfinite(a)):
            raise DataError(
                f"{path}: prediction {sample_id!r} has shape {a.shape} (expected "
                f"{VELOCITY_FILE_SHAPE} (x, depth), finite)"
            )
        out[sample_id] = a.astype(np.float32)
    return out


__all__: Sequence[str] = (
    "SHOT_FILES",
    "VELOCITY_FILE",
    "DataError",
    "check_dataset",
    "list_samples",
    "read_sample",
    "read_submission",
    "write_submission",
)
