"""``python -m fwi_jax.infer``: ensemble inference with flip TTA, sharded over devices, written to
one competition submission file (SPEC §1, §2.4, §5).

    python -m fwi_jax.infer --data DIR [--list ids.txt] --checkpoints C1 C2 ... --out submission.npz \
        [--config NAME] [--no-tta] [--dtype bfloat16] [--batch 8] [--val] [--plot K]
    python -m fwi_jax.infer --data DIR --ensemble ensemble.json --out submission.npz

DIR: a folder of sample folders, or a packed store (``python -m fwi_jax.data pack``; a float16
store's batches reach the device as float16 and are cast to float32 there, exactly).

Members: a params checkpoint (``fwi_jax.checkpoint.save_params``; carries its config), a training
run directory (its best params, EMA when active), or a PyTorch ``state_dict`` of the reference
solution (``.pth``/``.pt`` read with ``torch.load(weights_only=True)``, or ``.safetensors``),
converted on the fly for ``--config``. An ensemble file is a JSON list of
``{"checkpoint": PATH, "config": NAME or null, "weight": 1.0}``; relative paths are taken from
the ensemble file's folder.

How it runs: members whose configs build the same network (geometry + model) are stacked
(``jax.tree.map(np.stack)``) and evaluated with ``vmap``; the groups, flip TTA
(``½(f(x) + unflip f(flip x))``) and the weighted ensemble mean all live in ONE jitted function,
so a batch crosses the host-device boundary once each way. Batches are sharded over every device
on a 1-D ``data`` mesh (params replicated); each host reads only its slice of every global batch;
reading runs in background threads (grain) while the devices compute. The last batch is padded to
the global batch (one compiled shape) and the padding dropped.

Every input folder is checked before any compute (a packed store: its index, arrays, ids and, with
``--val``, velocities; its samples were checked when it was packed); a bad sample stops the run with
an error that names it. The submission (key = sample id, float64 (300, 1259) (x, depth)) is written
once, at the end, atomically, by ``fwi_jax.data.io.write_submission``: a failed run leaves no file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fwi_jax.checkpoint import is_params_checkpoint, load_params
from fwi_jax.config import Config, ConfigError, add_override_argument, apply_overrides, load_config
from fwi_jax.host import tune_cpu_host
from fwi_jax.model import apply_model, create_model
from fwi_jax.preprocess import flip
from fwi_jax.sharding import data_mesh, initialize_distributed

TORCH_SUFFIXES = (".pth", ".pt", ".safetensors")
DTYPES = ("float32", "bfloat16", "float16")


class InferenceError(ValueError):
    """A user error (bad member, config, id list or sample); the message names the culprit."""


# ---------------------------------------------------------------------------------------------
# Members: what to load, and loading it


@dataclasses.dataclass(frozen=True)
class MemberSpec:
    """One ensemble member as the user names it."""

    checkpoint: str
    config: str | None = None  # config of members that carry none (PyTorch state_dicts)
    weight: float = 1.0


@dataclasses.dataclass
class Member:
    cfg: Config
    params: Any  # nested dict of float32 NumPy arrays
    weight: float
    source: str


def read_ensemble_file(path: str | pathlib.Path) -> list[MemberSpec]:
    """JSON list of {"checkpoint", "config" (optional), "weight" (optional, > 0)} -> specs.
    Relative checkpoint paths are resolved against the ensemble file's folder."""
    path = pathlib.Path(path).expanduser()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise InferenceError(f"ensemble file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InferenceError(f"ensemble file {path}: not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise InferenceError(f"ensemble file {path}: expected a non-empty JSON list of members")
    specs = []
    for i, entry in enumerate(entries):
        where = f"ensemble file {path}, member {i}"
        if not isinstance(entry, dict) or "checkpoint" not in entry:
            raise InferenceError(f"{where}: expected an object with a 'checkpoint' key, got {entry!r}")
        unknown = set(entry) - {"checkpoint", "config", "weight"}
        if unknown:
            raise InferenceError(f"{where}: unknown keys {sorted(unknown)} (allowed: checkpoint, config, weight)")
        ckpt = pathlib.Path(entry["checkpoint"]).expanduser()
        if not ckpt.is_absolute():
            ckpt = path.parent / ckpt
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise InferenceError(f"{where}: weight must be a positive number, got {weight!r}")
        specs.append(MemberSpec(str(ckpt), entry.get("config"), float(weight)))
    return specs


def resolve_params_dir(path: pathlib.Path) -> pathlib.Path:
    """A params checkpoint as given, or the best params of a training run directory."""
    if is_params_checkpoint(path):
        return path
    # a training run (fwi_jax.train) keeps its best model as a params checkpoint under best/
    # (EMA weights once the EMA is active, as the reference validated and saved them)
    for name in ("best", "best_params"):
        if is_params_checkpoint(path / name):
            return path / name
    raise InferenceError(
        f"member {path}: not a params checkpoint (no params/ + config.json), not a training run with a "
        f"best/ params checkpoint, and not a PyTorch file ({', '.join(TORCH_SUFFIXES)})"
    )


def load_member(spec: MemberSpec, default_config: str | None = None,
                overrides: Sequence[str] = ()) -> Member:
    """Load one member; PyTorch state_dicts are converted for ``spec.config or default_config``.
    ``overrides`` (``model.dtype=bfloat16`` ...) apply to every member's config."""
    path = pathlib.Path(spec.checkpoint).expanduser()
    if not path.exists():
        raise InferenceError(f"member {path} does not exist")
    config_name = spec.config or default_config
    try:
        if path.is_file() and path.suffix in TORCH_SUFFIXES:
            if config_name is None:
                raise InferenceError(f"member {path} is a PyTorch state_dict and carries no config: name it "
                                     f"with --config (or 'config' in the ensemble file)")
            from fwi_jax.convert import convert_file  # needs torch only for .pth/.pt

            cfg = load_config(config_name)
            params = convert_file(path, cfg)
        else:
            cfg, params = load_params(resolve_params_dir(path))
            if spec.config is not None:
                named = load_config(spec.config)
                if network_key(named) != network_key(cfg):
                    raise InferenceError(f"member {path}: its saved config {cfg.name!r} builds a different network "
                                         f"than the config {spec.config!r} named for it")
        cfg = apply_overrides(cfg, list(overrides))
    except (ConfigError, FileNotFoundError) as e:
        raise InferenceError(f"member {path}: {e}") from None
    except ValueError as e:  # convert.CheckpointMismatch and unreadable torch files
        if isinstance(e, InferenceError):
            raise
        raise InferenceError(f"member {path}: {e}") from None
    return Member(cfg=cfg, params=params, weight=spec.weight, source=str(path))


# ---------------------------------------------------------------------------------------------
# Grouping, stacking and the jitted ensemble


def network_key(cfg: Config) -> str:
    """Members with equal keys build the same graph (geometry + model); training settings differ freely."""
    return json.dumps({"geometry": dataclasses.asdict(cfg.geometry), "model": dataclasses.asdict(cfg.model)},
                      sort_keys=True)


@dataclasses.dataclass
class Group:
    """Members of one network: params stacked on a new leading axis (M, ...), weights (M,)."""

    cfg: Config
    graphdef: Any
    params: Any
    weights: np.ndarray
    sources: list[str]


def stack_params(params: Sequence[Any]) -> Any:
    """[tree, tree, ...] -> tree of arrays with a leading member axis."""
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a, np.float32) for a in leaves]), *params)


def group_members(members: Sequence[Member]) -> list[Group]:
    """Group members by network (first-seen order) and stack each group's params."""
    if not members:
        raise InferenceError("no ensemble members given (--checkpoints or --ensemble)")
    out_shapes = {m.cfg.geometry.out_shape for m in members}
    in_shapes = {(m.cfg.geometry.n_time, m.cfg.geometry.n_receivers) for m in members}
    if len(out_shapes) > 1 or len(in_shapes) > 1:
        raise InferenceError("ensemble members disagree on input or output grids: "
                             + ", ".join(f"{m.source}: in {m.cfg.geometry.n_time}x{m.cfg.geometry.n_receivers} "
                                         f"out {m.cfg.geometry.out_shape}" for m in members))
    by_key: dict[str, list[Member]] = {}
    for m in members:
        by_key.setdefault(network_key(m.cfg), []).append(m)
    groups = []
    for ms in by_key.values():
        structures = {jax.tree.structure(m.params) for m in ms}
        if len(structures) > 1:
            raise InferenceError(f"members {[m.source for m in ms]} share a config but not a parameter tree")
        graphdef = graphdef_of(ms[0].cfg)
        groups.append(Group(cfg=ms[0].cfg, graphdef=graphdef, params=stack_params([m.params for m in ms]),
                            weights=np.array([m.weight for m in ms], np.float32),
                            sources=[m.source for m in ms]))
    return groups


_GRAPHDEFS: dict[str, Any] = {}


def graphdef_of(cfg: Config) -> Any:
    """The NNX graphdef of ``cfg``'s network, traced abstractly (no params allocated), cached."""
    key = network_key(cfg)
    if key not in _GRAPHDEFS:
        holder = {}

        def build():
            holder["graphdef"], params = create_model(cfg)
            return params

        jax.eval_shape(build)
        _GRAPHDEFS[key] = holder["graphdef"]
    return _GRAPHDEFS[key]


def member_predictions(graphdef: Any, stacked: Any, x: jax.Array, tta: bool,
                       member_chunk: int | None = None, tta_in_batch: bool = True) -> jax.Array:
    """Every member's prediction: stacked params (M, ...) and x (B, 6, T, R) -> (M, B, depth, x).
    x float32, or float16 (the model casts it to float32, exactly). With ``tta``: ½(f(x) + unflip f(flip x)),
    the flipped copy riding in the same batch (``tta_in_batch``: one forward pass of 2B), or else
    in a second pass of B after the first (``lax.map``: on CPU a batch of B is faster per sample).
    Members are vmapped; ``member_chunk`` bounds how many run at once (``lax.map`` in chunks)."""
    b = x.shape[0]
    if tta and not tta_in_batch:
        pair = jnp.stack([x, flip(x)])  # (2, B, ...): x, then its flipped copy

        def run(p):
            pred = jax.lax.map(lambda xi: apply_model(graphdef, p, xi), pair)  # (2, B, depth, x)
            return pred.reshape(2 * b, *pred.shape[2:])  # as the in-batch layout: x rows, then flipped
    else:
        x_in = jnp.concatenate([x, flip(x)], axis=0) if tta else x
        run = lambda p: apply_model(graphdef, p, x_in)
    m = jax.tree.leaves(stacked)[0].shape[0]
    if member_chunk is None or member_chunk >= m:
        pred = jax.vmap(run)(stacked)
    else:
        pred = jax.lax.map(run, stacked, batch_size=member_chunk)
    if tta:
        pred = 0.5 * (pred[:, :b] + pred[:, b:][..., ::-1])  # [..., ::-1] = preprocess.flip's velocity mirror
    return pred


def ensemble_fn(groups: Sequence[Group], tta: bool = True, member_chunk: int | None = None,
                tta_in_batch: bool = True) -> Callable:
    """A pure function (params tuple, weights tuple, x) -> weighted ensemble mean (B, depth, x).
    Jit it once: all groups, TTA and the mean are one program."""
    graphdefs = [g.graphdef for g in groups]

    def f(params: tuple, weights: tuple, x: jax.Array) -> jax.Array:
        total, norm = 0.0, 0.0
        for graphdef, p, w in zip(graphdefs, params, weights):
            pred = member_predictions(graphdef, p, x, tta, member_chunk, tta_in_batch)
            total = total + jnp.einsum("m,mbhw->bhw", w, pred, precision=jax.lax.Precision.HIGHEST)
            norm = norm + w.sum()
        return total / norm

    return f


# ---------------------------------------------------------------------------------------------
# Devices


def default_member_chunk(device: jax.Device) -> int | None:
    """Members run at once by default: on CPU one (``lax.map``: each member's activations stay in
    cache; tiny_s8, 3 members with TTA on 2 cores: 0.112 vs 0.090 samples/s with all vmapped,
    fused_cpu attention, docs/performance.md); elsewhere all of them (None: vmap keeps an
    accelerator busy)."""
    return 1 if device.platform == "cpu" else None


def default_tta_in_batch(device: jax.Device) -> bool:
    """Whether the flipped copy rides in the same forward pass by default: not on CPU, where a
    tiny_s8 forward costs 1.8 s per sample at batch 1 and 2.0-2.2 s at batch 2-4 (2 cores,
    docs/performance.md); elsewhere yes (a larger batch keeps an accelerator busy)."""
    return device.platform != "cpu"


def default_batch(device: jax.Device) -> int:
    """``python -m fwi_jax.infer``'s global batch when ``--batch`` is not given: 1 on CPU (see
    `default_tta_in_batch`), 4 elsewhere."""
    return 1 if device.platform == "cpu" else 4


class Predictor:
    """Ensemble on a mesh: ``predict(x_local)`` -> (B_global, depth, x) float32 NumPy on every host.

    ``x_local`` is this host's slice (B_global / n_hosts, 6, T, R) of the global batch: float32, or
    float16 (sent as float16, half the bytes, and cast to float32 on the device, exactly); any other
    dtype is converted to float32 on the host. One compiled program per input dtype."""

    def __init__(self, groups: Sequence[Group], tta: bool = True, member_chunk: int | None = None,
                 mesh: Mesh | None = None, tta_in_batch: bool | None = None):
        """``member_chunk``: stacked members run at once, None = `default_member_chunk`;
        ``tta_in_batch``: see `member_predictions`, None = `default_tta_in_batch`."""
        self.groups = list(groups)
        self.mesh = mesh or data_mesh()
        device = self.mesh.devices.flat[0]
        if member_chunk is None:
            member_chunk = default_member_chunk(device)
        if tta_in_batch is None:
            tta_in_batch = default_tta_in_batch(device)
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(tuple(g.params for g in self.groups), replicated)
        self.weights = jax.device_put(tuple(g.weights for g in self.groups), replicated)
        self._fn = jax.jit(ensemble_fn(self.groups, tta, member_chunk, tta_in_batch),
                           out_shardings=self.batch_sharding)

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def _global_batch(self, x_local: np.ndarray) -> jax.Array:
        x_local = np.asarray(x_local)
        if x_local.dtype not in (np.float16, np.float32):
            x_local = x_local.astype(np.float32)
        return jax.make_array_from_process_local_data(self.batch_sharding, x_local)

    def dispatch(self, x_local: np.ndarray) -> jax.Array:
        """Start the forward pass on a host batch; returns the (global, sharded) device result."""
        return self._fn(self.params, self.weights, self._global_batch(x_local))

    def lower(self, x_local: np.ndarray) -> jax.stages.Lowered:
        """The program for batches like ``x_local``, lowered (``.compile()`` gives XLA's cost and
        memory analyses; scripts/bench_infer.py reports them)."""
        return self._fn.lower(self.params, self.weights, self._global_batch(x_local))

    @staticmethod
    def fetch(y: jax.Array) -> np.ndarray:
        """Device result -> the whole global batch as NumPy on every host."""
        if jax.process_count() == 1:
            return np.asarray(jax.device_get(y))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(y, tiled=True))

    def __call__(self, x_local: np.ndarray) -> np.ndarray:
        return self.fetch(self.dispatch(x_local))


# ---------------------------------------------------------------------------------------------
# Samples: ids, checks, host batches


def list_samples(data: str | pathlib.Path, id_list: str | pathlib.Path | None = None) -> list[str]:
    """Sorted sample ids: those of ``id_list`` (one per line) or every sample of ``data`` (its
    sub-folders, or the ids of a packed store). Listed ids that are missing are an error naming them."""
    from fwi_jax.data import io as data_io
    from fwi_jax.data import pack

    try:
        ids = pack.list_ids(pathlib.Path(data).expanduser(), id_list)
    except (data_io.DataError, OSError) as e:
        raise InferenceError(str(e)) from None
    if not ids:
        raise InferenceError(f"no samples under {data}")
    return ids


def check_samples(root: pathlib.Path, ids: Sequence[str], need_velocity: bool, v_range=(0.5, 10.0),
                  progress: bool = True) -> None:
    """Validate every sample (``fwi_jax.data.io.check_dataset``) before any compute; raise naming
    every bad one (up to 20 listed). A packed store was validated sample by sample when it was
    packed: here its index, arrays and ids are checked, velocities are required with
    ``need_velocity``, and each sample's velocities are checked again only when ``v_range`` is
    narrower than the range the store was packed with."""
    from fwi_jax.data import io as data_io
    from fwi_jax.data import pack

    if pack.is_packed(root):
        try:
            bad = pack.PackedSource(root, ids, v_range=v_range, require_velocity=need_velocity or None).check()
        except (data_io.DataError, OSError) as e:  # the store itself: index, arrays, no velocities
            raise InferenceError(f"{e}; nothing was computed") from None
    else:
        bad = data_io.check_dataset(root, ids, v_range=v_range, require_velocity=need_velocity or None,
                                    progress=progress)
    if bad:
        lines = [f"  {sample_id}: {message}" for sample_id, message in bad[:20]]
        raise InferenceError(f"{len(bad)} bad sample(s) of {len(ids)}; nothing was computed:\n" + "\n".join(lines)
                             + ("\n  ..." if len(bad) > 20 else ""))


def global_batch_ids(ids: Sequence[str], k: int, local: int, process_count: int) -> list[str | None]:
    """Ids of global batch ``k`` in device order (host 0's slice, host 1's slice, ...), None for
    padding. The loader gives host p the samples ``ids[p::process_count]`` in batches of ``local``."""
    out = []
    for p in range(process_count):
        for j in range(local):
            i = p + process_count * (k * local + j)
            out.append(ids[i] if i < len(ids) else None)
    return out


def host_batches(cfg: Config, root: pathlib.Path, ids: Sequence[str], batch: int, workers: int = 0,
                 prefetch: int = 2):
    """This host's batches of every global batch, padded to ``batch / hosts`` samples (one compiled
    shape): yields (k, {"x", "v" if present, "id"}, n_real). Reading is the data pipeline's
    (``fwi_jax.data.pipeline.make_loader``: threads ``prefetch`` batches ahead, or ``workers``
    processes), so it overlaps the devices' compute; hosts with fewer batches send padding."""
    from fwi_jax.data.pipeline import batch_x_dtype, make_loader

    n_hosts = jax.process_count()
    if batch % n_hosts:
        raise InferenceError(f"--batch {batch} is not a multiple of the host count {n_hosts}")
    local = batch // n_hosts
    n_global = -(-(-(-len(ids) // n_hosts)) // local)  # host 0 holds the most samples
    x_dtype = batch_x_dtype(cfg, root)  # float16 from a float16 store (data.host_dtype "store")
    loader = make_loader(cfg.replace(**{"data.prefetch": max(1, prefetch)}), root, ids, train=False,
                         batch_size=batch, workers=workers)
    it = iter(loader)
    g = cfg.geometry
    last = None
    for k in range(n_global):
        host = next(it, None)
        if host is None:  # this host ran out before host 0: a batch of padding only
            host = ({key: a[-1:] for key, a in last.items()} if last is not None else
                    {"x": np.zeros((1, 6, g.n_time, g.n_receivers), x_dtype), "id": np.array([""])})
            n_real = 0
        else:
            n_real = len(host["id"])
        if len(host["x"]) < local:  # pad by repeating the last sample; its outputs are dropped
            host = {key: np.concatenate([a, np.repeat(a[-1:], local - len(a), axis=0)]) for key, a in host.items()}
        last = host
        yield k, host, n_real


def _progress(enabled: bool, desc: str, total: int):
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="sample", dynamic_ncols=True, disable=not enabled)


# ---------------------------------------------------------------------------------------------
# The run


def competition_mape(v_true: np.ndarray, v_pred: np.ndarray) -> float:
    """SPEC §1: mean over pixels of |v_true - v_pred| / (v_true + 1e-8), in float64."""
    v_true = np.asarray(v_true, np.float64)
    return float(np.mean(np.abs(v_true - np.asarray(v_pred, np.float64)) / (v_true + 1e-8)))


@dataclasses.dataclass
class Result:
    predictions: dict[str, np.ndarray]  # id -> float64 (x, depth), the submission's layout
    mape: dict[str, float]  # id -> competition MAPE (--val only), in input order
    kept: dict[str, dict[str, Any]]  # first --plot samples: {"x", "v" or None, "pred" (depth, x)}
    seconds: float


def predict_samples(predictor: Predictor, root: pathlib.Path, ids: Sequence[str], batch: int, *,
                    val: bool = False, keep: int = 0, workers: int = 0, prefetch: int = 2,
                    progress: bool = True) -> Result:
    """Run the ensemble over the (already checked) samples ``ids`` under ``root`` in global
    batches of ``batch``. One batch stays in flight: batch k+1 is dispatched before batch k's
    result is fetched, so host work (reading, MAPE, float64 copies) overlaps device compute."""
    n_hosts = jax.process_count()
    if n_hosts > 1 and (val or keep):
        raise InferenceError("--val and --plot run on one host only (they need every sample's data)")
    cfg = predictor.groups[0].cfg
    preds: dict[str, np.ndarray] = {}
    scores: dict[str, float] = {}
    kept: dict[str, dict[str, Any]] = {}
    bar = _progress(progress, "infer", len(ids))
    t0 = time.perf_counter()

    def finish(k, host, y):
        out = Predictor.fetch(y)
        gids = global_batch_ids(ids, k, batch // n_hosts, n_hosts)
        if n_hosts == 1:  # the loader's own ids must be the ones we expect
            assert [str(i) for i in host["id"][:len([g for g in gids if g is not None])]] == [
                g for g in gids if g is not None], (host["id"], gids)
        for j, sid in enumerate(gids):
            if sid is None:
                continue
            preds[sid] = out[j].T.astype(np.float64)
            if val:
                scores[sid] = competition_mape(host["v"][j], out[j])
            if len(kept) < keep:
                kept[sid] = {"x": host["x"][j], "v": host["v"][j] if val else None, "pred": out[j]}
            bar.update(1)
        if val:
            bar.set_postfix(mape=f"{np.mean(list(scores.values())):.5f}")

    pending = None
    for k, host, _ in host_batches(cfg, root, ids, batch, workers, prefetch):
        if val and "v" not in host:
            raise InferenceError(f"--val: batch {k} has no vp_model.npy")
        y = predictor.dispatch(host["x"])
        if pending is not None:
            finish(*pending)
        pending = (k, host, y)
    if pending is not None:
        finish(*pending)
    bar.close()
    if len(preds) != len(ids):
        raise InferenceError(f"internal: {len(preds)} predictions for {len(ids)} samples")
    return Result(preds, {i: scores[i] for i in ids} if val else {}, kept, time.perf_counter() - t0)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fwi_jax.infer", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Ensemble file: JSON list of {\"checkpoint\": PATH, \"config\": NAME|null, "
                                        "\"weight\": 1.0}")
    ap.add_argument("--data", required=True, help="folder of sample folders (competition format), or a packed "
                    "store (python -m fwi_jax.data pack)")
    ap.add_argument("--list", help="text file of sample ids, one per line (default: every sample)")
    members = ap.add_mutually_exclusive_group(required=True)
    members.add_argument("--checkpoints", nargs="+", metavar="CKPT",
                         help="params checkpoints, training runs, or reference state_dicts (.pth/.pt/.safetensors)")
    members.add_argument("--ensemble", help="JSON ensemble file (config, checkpoint, weight per member)")
    ap.add_argument("--config", help="config (name or path) of members that carry none (PyTorch state_dicts)")
    ap.add_argument("--out", required=True, help="submission .npz to write (atomically, once)")
    ap.add_argument("--no-tta", action="store_true", help="skip the flip test-time augmentation")
    ap.add_argument("--dtype", choices=DTYPES, help="compute dtype of every member (params stay float32)")
    ap.add_argument("--batch", type=int, default=None,
                    help="global batch, rounded up to a multiple of the devices (default: 1 on CPU, 4 elsewhere)")
    ap.add_argument("--member-chunk", type=int, help="run at most this many stacked members at once "
                    "(default: 1 on CPU, all elsewhere; fewer save memory)")
    add_override_argument(ap)
    ap.add_argument("--val", action="store_true", help="score against vp_model.npy: print MAPE, write per-sample CSV")
    ap.add_argument("--val-csv", help="per-sample MAPE CSV (default: OUT with .csv)")
    ap.add_argument("--plot", type=int, default=0, metavar="K", help="save PNG figures of the first K samples")
    ap.add_argument("--plot-dir", help="folder for --plot figures (default: OUT without suffix + '_plots')")
    ap.add_argument("--workers", type=int, default=0, help="reader processes (0: reader threads in this process)")
    ap.add_argument("--prefetch", type=int, default=2, help="batches read ahead (and reader threads)")
    ap.add_argument("--distributed", action="store_true",
                    help="force jax.distributed.initialize() (called automatically when the environment describes a cluster)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    initialize_distributed(force=args.distributed)  # each host reads its share; process 0 writes the file
    tune_cpu_host()  # first: jax.process_index() and friends start the backends
    out = pathlib.Path(args.out).expanduser()
    progress = not args.no_progress and jax.process_index() == 0
    try:
        if out.suffix != ".npz":
            raise InferenceError(f"--out {out}: the submission must be a .npz file")
        if not out.parent.is_dir():
            raise InferenceError(f"--out {out}: folder {out.parent} does not exist")
        if args.batch is None:
            args.batch = default_batch(jax.devices()[0])
        if args.batch < 1:
            raise InferenceError(f"--batch {args.batch}: must be at least 1")
        overrides = list(args.set) + ([f"model.dtype={args.dtype}"] if args.dtype else [])
        specs = (read_ensemble_file(args.ensemble) if args.ensemble
                 else [MemberSpec(c) for c in args.checkpoints])
        root = pathlib.Path(args.data).expanduser()
        ids = list_samples(root, args.list)
        members = [load_member(s, args.config, overrides) for s in specs]
        groups = group_members(members)
        check_samples(root, ids, need_velocity=args.val, v_range=groups[0].cfg.data.v_range,
                      progress=progress)  # before any compute
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predictor = Predictor(groups, tta=not args.no_tta, member_chunk=args.member_chunk)
    batch = -(-args.batch // predictor.n_devices) * predictor.n_devices
    if batch != args.batch:
        print(f"--batch {args.batch} rounded up to {batch}, a multiple of the {predictor.n_devices} devices")
    desc = ", ".join(f"{len(g.sources)} x {g.cfg.name}" for g in groups)
    print(f"{len(ids)} samples, ensemble {desc}, TTA {'off' if args.no_tta else 'on'}, "
          f"{predictor.n_devices} {jax.devices()[0].platform} device(s), global batch {batch}")
    try:
        result = predict_samples(predictor, root, ids, batch, val=args.val, keep=args.plot, workers=args.workers,
                                 prefetch=args.prefetch, progress=progress)
    except (InferenceError, ValueError, OSError) as e:  # a sample that broke while reading
        print(f"error: {e}\nno submission written", file=sys.stderr)
        return 2
    print(f"{len(result.predictions)} samples in {result.seconds:.1f} s "
          f"({len(result.predictions) / max(result.seconds, 1e-9):.2f} samples/s, first compile included)")
    if jax.process_index() == 0:
        from fwi_jax.data import io as data_io

        data_io.write_submission(out, result.predictions)
        print(f"wrote {out} ({len(result.predictions)} predictions, float64 (x, depth))")
        if args.val:
            csv = pathlib.Path(args.val_csv).expanduser() if args.val_csv else out.with_suffix(".csv")
            lines = ["id,mape"] + [f"{i},{m:.8f}" for i, m in result.mape.items()]
            csv.write_text("\n".join(lines) + "\n")
            print(f"validation MAPE {np.mean(list(result.mape.values())):.6f} over {len(result.mape)} samples "
                  f"(per sample: {csv})")
        if args.plot:
            from fwi_jax import plots

            plot_dir = pathlib.Path(args.plot_dir).expanduser() if args.plot_dir else out.with_name(out.stem + "_plots")
            plot_dir.mkdir(parents=True, exist_ok=True)
            for sid, item in result.kept.items():
                plots.plot_sample(plot_dir / f"{sid}.png", sid, item["x"], item["pred"], item["v"])
            print(f"wrote {len(result.kept)} figures to {plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
