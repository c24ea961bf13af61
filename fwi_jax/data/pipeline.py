"""grain input pipeline over competition-format sample folders (reference §1-§2) or a packed store.

    source (folders of an id list, `read_sample`; or `pack.PackedSource` when ``root`` holds an
    index.json, same arrays) -> seeded shuffle, reshuffled every epoch (`EpochShuffle`)
    (train) -> repeat -> flip with p = cfg.data.flip_p (train; per-sample RNG from grain's
    ``random_map``, seeded by (seed, global index), so independent of worker count) -> this host's
    share ``[jax.process_index()::jax.process_count()]`` -> batch (`pack.StackBatch`: each sample
    copied once into the batch, the flip applied on the way) -> threads / worker processes.

Batches are dicts {"x": (B, 6, 10000, 31), "v": (B, 1259, 300) float32 km/s (depth, x),
"id": (B,) str}; "v" is left out when the folders have no vp_model.npy (test data). x is float32,
except from a float16 packed store with ``cfg.data.host_dtype == "store"`` (the default), where it
stays float16 and the jitted programs cast it to float32 on the device, exactly
(the model's first operation); `batch_x_dtype` says which. The iterator is grain's
``DatasetIterator``: ``get_state()`` / ``set_state(state)`` resume exactly. Reading in threads
(0 workers), a batch's arrays are recycled for a later batch once nothing references them any
more (`pack.StackBatch`): a batch stays intact for as long as it, a view of it or a JAX array made
from it is alive.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import grain
import numpy as np

from fwi_jax import preprocess
from fwi_jax.data import io, pack


class FolderSource(grain.sources.RandomAccessDataSource):
    """Random access to sample folders ``root/<id>``: element i is {"x", "v", "id"} of ids[i].

    Picklable (root and ids only), so grain worker processes can rebuild it."""

    def __init__(
        self,
        root,
        ids: Sequence[str],
        *,
        v_range=(0.5, 10.0),
        require_velocity: bool | None = None,
        time_resample: str = "drop_last",
    ):
        self.root = str(root)
        self.ids = list(ids)
        self.v_range = tuple(v_range)
        self.require_velocity = require_velocity
        self.time_resample = time_resample

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        sample_id = self.ids[index]
        x, v = io.read_sample(
            pathlib.Path(self.root) / sample_id,
            v_range=self.v_range,
            require_velocity=self.require_velocity,
            time_resample=self.time_resample,
        )
        element = {"x": x, "id": np.asarray(sample_id)}
        if v is not None:
            element["v"] = v
        return element

    def __repr__(self) -> str:
        return f"FolderSource(root={self.root!r}, n={len(self.ids)})"


class RandomFlip(grain.transforms.RandomMap):
    """Mirror x and v together (`preprocess.flip`) with probability ``p``.

    ``defer=True``: only mark the element (key `pack.FLIP`); `pack.StackBatch` mirrors it while
    batching (same draws, same batches, one copy fewer)."""

    def __init__(self, p: float, *, defer: bool = False, channels: bool = True):
        """``channels``: whether the flip reverses channels too (``geometry.flip_channels``)."""
        self.p = float(p)
        self.defer = bool(defer)
        self.channels = bool(channels)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return element
        out = dict(element)
        if self.defer:
            out[pack.FLIP] = True
            return out
        out["x"] = np.ascontiguousarray(preprocess.flip(element["x"], channels=self.channels))
        if "v" in element:
            out["v"] = np.ascontiguousarray(element["v"][..., ::-1])
        return out


class EpochShuffle(grain.MapDataset):
    """``ds.shuffle(seed)`` of grain, at O(1) per element: element i of epoch e (a following
    ``repeat`` counts epochs past ``len``) is ``parent[e * n + perm_e[i]]``, ``perm_e`` a
    permutation of the n elements drawn once per epoch from NumPy's Philox keyed by (seed, e) and
    cached. grain's ``index_shuffle`` costs per element a time inversely proportional to n, large
    for the small datasets of tests and demos; this costs one permutation per epoch. Deterministic
    in (seed, index), so exact resume and worker-count independence hold as with grain's. Pickles
    with its small cache (worker processes)."""

    _KEEP = 3  # epochs of permutations cached (reader threads may straddle an epoch boundary)

    def __init__(self, parent: grain.MapDataset, *, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:  # reader threads may race here; both compute the same permutation
            rng = np.random.Generator(
                np.random.Philox(key=np.array([self._seed, epoch], np.uint64))
            )
            perm = rng.permutation(len(self._parent))
            perms = dict(self._perms)
            perms[epoch] = perm
            for old in sorted(perms)[: -self._KEEP]:
                del perms[old]
            self._perms = perms
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, i = divmod(index, n)
        return self._parent[epoch * n + int(self._perm(epoch)[i])]


def batch_x_dtype(cfg, root) -> np.dtype:
    """dtype of x in the batches `make_loader` gives for ``root`` under ``cfg.data.host_dtype``:
    float16 for a float16 packed store with host_dtype "store", else float32."""
    if cfg.data.host_dtype == "store" and io.is_packed(root):
        return np.dtype(pack.read_index(root)["dtype"])
    return np.dtype(np.float32)


def _hosts(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int]:
    """(this host, host count), JAX's where not given; the global ``batch_size`` must split
    evenly over the hosts."""
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    if batch_size % process_count:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of the host count {process_count}"
        )
    return process_index, process_count


def make_dataset(
    cfg,
    root,
    ids: Sequence[str] | None,
    *,
    train: bool,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    reuse: int = 0,
) -> grain.MapDataset:
    """The batched ``grain.MapDataset`` behind `make_loader` (one element = one host batch).

    ``root``: a folder of sample folders, or a packed store (`pack.pack`; detected by its
    index.json); ``ids`` the samples to read, in this order (None: every sample of ``root``).
    ``batch_size`` is the global batch; each of ``process_count`` hosts gets batch_size /
    process_count samples per batch. ``num_epochs`` None = forever in training, once in evaluation.
    x comes in `batch_x_dtype` (``cfg.data.host_dtype``). ``reuse``: batch arrays recycled once
    unreferenced, for up to this many batches (`pack.StackBatch`)."""
    process_index, process_count = _hosts(batch_size, process_index, process_count)
    require_velocity = True if train else None
    x_float32 = batch_x_dtype(cfg, root) == np.float32
    time_resample = cfg.geometry.time_resample
    if io.is_packed(root):
        packed_with = pack.read_index(root).get("time_resample", "drop_last")
        if packed_with != time_resample:
            raise io.DataError(
                f"{root}: packed with geometry.time_resample={packed_with}, the config says "
                f"{time_resample}; pack the folders again with --time-resample {time_resample}"
            )
        # raw views of the store: StackBatch below copies each sample once (converting float16
        # only with data.host_dtype "float32")
        source = pack.PackedSource(
            root, ids, v_range=cfg.data.v_range, require_velocity=require_velocity, raw=True
        )
    else:
        source = FolderSource(
            root,
            io.list_samples(root) if ids is None else ids,
            v_range=cfg.data.v_range,
            require_velocity=require_velocity,
            time_resample=time_resample,
        )
    if not len(source):
        raise ValueError(f"no sample ids given for {root}")
    ds = grain.MapDataset.source(source)
    if train:
        ds = EpochShuffle(ds, seed=seed)  # a new permutation for every epoch of the repeat below
    if num_epochs is None and not train:
        num_epochs = 1
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    if train and cfg.data.flip_p > 0:
        ds = ds.random_map(
            RandomFlip(cfg.data.flip_p, defer=True, channels=cfg.geometry.flip_channels), seed=seed
        )
    ds = ds[process_index::process_count]
    # StackBatch: grain's batching, plus the deferred flip (and any float16 conversion) in the one
    # copy
    batch_fn = pack.StackBatch(x_float32, reuse, cfg.geometry.flip_channels)
    return ds.batch(batch_size // process_count, drop_remainder=train, batch_fn=batch_fn)


def make_loader(
    cfg,
    root,
    ids: Sequence[str] | None,
    *,
    train: bool,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    workers: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """Iterable of host batches (see module doc). ``iter(loader)`` gives a grain iterator with
    ``get_state()`` / ``set_state()``. ``workers`` (default cfg.data.workers) > 0 reads in that
    many worker processes; 0 reads in threads of this process. Output is identical either way."""
    workers = cfg.data.workers if workers is None else workers
    prefetch = max(1, int(cfg.data.prefetch))
    # reading in threads: batch arrays are recycled once unreferenced, for as many batches as can
    # be alive at once here (the buffer, the consumer's batch and the one before it, one spare)
    ds = make_dataset(
        cfg,
        root,
        ids,
        train=train,
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        reuse=0 if workers > 0 else prefetch + 3,
    )
    if workers > 0:
        # StackBatch writes each batch straight into shared memory in the workers. grain enables
        # that only when the batch is the dataset it sends; ours sits under to_iter_dataset, so
        # grain would copy every batch into shared memory once more (several times slower)
        ds.enable_shared_memory_output()
    # threads read whole batches in parallel; the buffer counts batches (~60 MB each at B=8)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch)
    )
    if workers > 0:
        from absl import flags

        # grain 0.2.18 reads an absl flag when starting workers and fails if the program never
        # parsed flags (plain scripts, pytest); their defaults are what we want
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch)
        )
    return it


def global_batch_ids(
    ids: Sequence[str], k: int, local: int, process_count: int
) -> list[str | None]:
    """Ids of global batch ``k`` of `host_batches` in device order (host 0's slice, host 1's
    slice, ...), None for padding: host p reads ``ids[p::process_count]`` in batches of
    ``local``."""
    out = []
    for p in range(process_count):
        for j in range(local):
            i = p + process_count * (k * local + j)
            out.append(ids[i] if i < len(ids) else None)
    return out


def host_batches(
    cfg,
    root,
    ids: Sequence[str],
    *,
    batch_size: int,
    velocity: bool,
    workers: int = 0,
    prefetch: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
):
    """One evaluation pass over ``ids`` (in order, no flip): this host's share of every global
    batch of ``batch_size``, padded so that every host yields the same number of batches of
    ``local = batch_size / hosts`` samples (one compiled shape, for validation and inference).

    Yields {"x": (local, 6, T, R), "v": (local, depth, x) km/s (with ``velocity`` only; a sample
    without vp_model.npy is then a `io.DataError`), "id": (local,) str, "mask": (local,) float32}.
    The padding rule, here only: a padded row has x zeros, v ones (finite, so a masked-out MAPE
    stays finite), id "" and mask 0; a host whose samples ran out yields whole batches of padding.
    `global_batch_ids` gives every host's ids. Reading runs ``prefetch`` batches ahead (default
    ``cfg.data.prefetch``) in threads, or in ``workers`` processes, overlapping the devices' work.
    ``process_index``/``process_count``: this host and the host count (default: JAX's)."""
    process_index, n_hosts = _hosts(batch_size, process_index, process_count)
    local = batch_size // n_hosts
    n_batches = math.ceil(math.ceil(len(ids) / n_hosts) / local)  # host 0 holds the most samples
    if prefetch is not None:
        cfg = cfg.replace(**{"data.prefetch": max(1, prefetch)})
    it = iter(
        make_loader(
            cfg,
            root,
            ids,
            train=False,
            batch_size=batch_size,
            workers=workers,
            process_index=process_index,
            process_count=n_hosts,
        )
    )
    g = cfg.geometry
    padding = {
        "x": np.zeros((local, 6, g.n_time, g.n_receivers), batch_x_dtype(cfg, root)),
        "id": np.full(local, ""),
    }
    if velocity:
        padding["v"] = np.ones((local, *g.out_shape), np.float32)
    for _ in range(n_batches):
        batch = next(it, None) or {}
        n = len(batch.get("id", ()))
        if n and velocity and "v" not in batch:
            raise io.DataError(
                f"{root}: samples {', '.join(map(str, batch['id']))} have no {io.VELOCITY_FILE}"
            )
        if n == local:
            out = {key: batch[key] for key in padding}
        else:  # the last batch, or none left on this host
            out = {
                key: np.concatenate([batch[key], pad[n:]]) if n else pad
                for key, pad in padding.items()
            }
        out["mask"] = (np.arange(local) < n).astype(np.float32)
        yield out
