"""Device mesh, logical-axis rules -> NamedSharding, batch sharding and multi-host start-up.

Parameters carry *logical* axis names (`embed`, `mlp`, `heads`, ...; metadata key `out_sharding`). A rules
table maps each logical name to a mesh axis, a tuple of mesh axes, or None (replicated), so model code never
names the mesh and a config switches between data parallel, FSDP and tensor parallel by editing the table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from emollm_jax.configuration import Section
from emollm_jax.pytree import path_keys, path_str

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# Logical name -> mesh axes. Weights are split over `fsdp` along their model dim and over `tensor` along the
# dim Megatron-style tensor parallelism splits (heads, MLP hidden, vocab); `data` only replicates weights.
# `batch` is the leading dim of every input batch (`data_sharding`).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_pos", None),
    ("audio_embed", "fsdp"),
    ("audio_mlp", "tensor"),
    ("audio_heads", "tensor"),
    ("audio_pos", None),
    ("proj_in", "fsdp"),
    ("proj_hidden", "tensor"),
    ("proj_out", "fsdp"),
    ("lora_rank", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """`config.mesh`: devices per mesh axis; one axis may be -1 (the rest of the devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def check(self) -> None:
        try:
            _check_sizes(dataclasses.asdict(self))
        except MeshShapeError as e:
            self.fail(e.axis or "data", str(e))


class MeshShapeError(ValueError):
    """A mesh shape that cannot be laid over the devices; `axis` is the one to change (None: the product)."""

    def __init__(self, axis: str | None, message: str):
        self.axis = axis
        super().__init__(message)


def _check_sizes(sizes: Mapping[str, int]) -> None:
    """Each size positive or -1, at most one -1."""
    for a, s in sizes.items():
        if s == 0 or s < -1:
            raise MeshShapeError(a, f"axis {a!r} has size {s}; use a positive size or -1")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshShapeError(free[1], f"axes {free} are all -1; at most one axis may be -1")


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Size of every axis of `MESH_AXES` for `num_devices` devices: missing axes are 1, the one -1 axis takes
    the rest. A shape that does not fit is a `MeshShapeError` naming the axis to change."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshShapeError(unknown[0], f"mesh shape {dict(shape)}: unknown axis {unknown}; axes are "
                             f"{MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    try:
        _check_sizes(sizes)
    except MeshShapeError as e:
        raise MeshShapeError(e.axis, f"mesh shape {dict(shape)}: {e}") from None
    fixed = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if free:
        if num_devices % fixed:
            others = {a: s for a, s in sizes.items() if s != -1}
            raise MeshShapeError(free[0], f"mesh shape {dict(shape)}: axis {free[0]!r} = -1 cannot take the "
                                 f"rest: {num_devices} devices are not divisible by the other axes {others} "
                                 f"(product {fixed})")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        bad = next((a for a, s in sizes.items() if s > 1 and num_devices % s), None)
        what = f"axis {bad!r} of size {sizes[bad]} does not divide" if bad else f"product {fixed} != "
        raise MeshShapeError(bad, f"mesh shape {dict(shape)}: {what} the {num_devices} devices; set one axis "
                             "to -1 or fix sizes")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all, every process) with axes `data`, `fsdp`, `tensor` in that order.

    `shape` maps axis -> size; one axis may be -1 (the rest of the devices), missing axes get size 1 (see
    `resolve_mesh_shape`). The axes are `Auto`, so `jax.jit` with explicit in/out shardings places everything
    and GSPMD fills in the middle.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    axis_sizes = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(axis_sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for i, rule in enumerate(rules):
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(
                f"sharding rules[{i}] = {rule!r}: expected (logical_name, mesh_axis | tuple | None)"
            )
        name, axes = rule
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        out.setdefault(name, axes)  # first match wins, as in flax's logical_axis_rules
    return out


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules, *, where: str = ""
) -> P:
    """PartitionSpec for one array with logical axis `names`.

    A dim whose size is not divisible by its mesh axes keeps the leading axes that do divide, drops the rest
    (logged); a mesh axis already used by an earlier dim is dropped too, since one axis cannot split two dims.
    """
    table = _rules_dict(rules)
    if len(names) != len(shape):
        raise ValueError(f"{where}: logical names {tuple(names)} do not match the array rank {len(shape)}")
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        wanted = table.get(name, ()) if name is not None else ()
        for a in wanted:
            if a not in mesh.shape:
                raise ValueError(
                    f"{where}: rule {name!r} -> {a!r} names no axis of the mesh {dict(mesh.shape)}"
                )
        kept: list[str] = []
        for a in wanted:
            if a in used:
                log.warning(
                    "%s dim %d (%s): mesh axis %r already used by another dim; not sharded on it",
                    where,
                    dim,
                    name,
                    a,
                )
                break
            if size % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]):
                log.warning(
                    "%s dim %d (%s) of size %d is not divisible by mesh axis %r (size %d); falling back "
                    "to %s for this dim",
                    where,
                    dim,
                    name,
                    size,
                    a,
                    mesh.shape[a],
                    kept or "replication",
                )
                break
            kept.append(a)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    return meta.get("out_sharding", meta.get("sharding_names"))


def logical_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every Variable of `abstract_state` (same tree; each Variable holds a NamedSharding).

    Works on abstract (`nnx.eval_shape`) or concrete states; Variables without logical names are replicated.
    """

    def one(path: tuple, var: Any) -> Any:
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, P())
        shape = np.shape(var.get_value()) if hasattr(var, "get_value") else np.shape(var.value)
        names = _logical_names(var)
        spec = P() if names is None else logical_to_spec(names, shape, mesh, rules, where=path_str(path))
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def optimizer_shardings(opt_state_shapes: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: leaves that mirror a param (mu, nu, accumulated grads) take its sharding.

    A leaf mirrors a param when the tail of its key path is that param's path and the shapes agree (optax
    wraps the param tree in named tuples / dicts, e.g. `inner_states/trainable/inner_state/0/mu/<param>`);
    everything else (counts, scalars) is replicated.
    """
    by_path = {path_keys(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings)}
    longest = max((len(p) for p in by_path), default=0)
    repl = NamedSharding(mesh, P())

    def one(path: tuple, leaf: Any) -> NamedSharding:
        keys = path_keys(path)
        for n in range(min(longest, len(keys)), 0, -1):
            sharding = by_path.get(keys[-n:])
            if sharding is not None:
                if len(sharding.spec) <= len(np.shape(leaf)):
                    return sharding
                break
        return repl

    return jax.tree_util.tree_map_with_path(one, opt_state_shapes)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore / `jit(out_shardings)` target for `abstract`."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), abstract, shardings
    )


def batch_axes(rules: Rules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes the batch dim is split over: the rules table's `batch` entry."""
    return _rules_dict(rules).get("batch", ())


def data_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Batch arrays: leading (batch) dim split over `batch_axes(rules)`, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(rules) or None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Global arrays from this process's rows: `int32[B_local, ...]` per process -> `[B_local * P, ...]`.

    Each process passes the rows its devices hold (its data-pipeline shard); with one process this is a
    sharded `device_put`.
    """
    sharding = data_sharding(mesh, rules)
    axes = batch_axes(rules)
    batch_shards = math.prod(mesh.shape[a] for a in axes)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count()
        if global_rows % batch_shards:
            raise ValueError(
                f"batch[{key!r}]: global batch {global_rows} (local {value.shape[0]} x "
                f"{jax.process_count()} processes) is not divisible by {'*'.join(axes)} = {batch_shards}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value, (global_rows, *value.shape[1:]))
    return out


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Start `jax.distributed` for multi-process runs; returns whether it did (a single process is a no-op).

    Sources, first hit wins: the arguments; env `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
    `JAX_PROCESS_ID`; otherwise jax's own cluster detection (SLURM: `SLURM_NTASKS`, `SLURM_PROCID`,
    `SLURM_STEP_NODELIST`, ...; Cloud TPU; Open MPI; k8s), which we only invoke when such an environment is
    present. On CPU, cross-process collectives need gloo, which must be chosen before the backend starts.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = _env_int("JAX_PROCESS_ID")
    explicit = num_processes is not None
    if explicit and num_processes <= 1:
        return False
    if not explicit and not _cluster_detected():
        if coordinator_address is not None:
            raise ValueError(
                f"coordinator address {coordinator_address!r} given but no process count: set "
                "num_processes / JAX_NUM_PROCESSES (and process_id / JAX_PROCESS_ID)"
            )
        return False
    if explicit and (coordinator_address is None or process_id is None):
        raise ValueError(
            f"num_processes={num_processes} needs coordinator_address (JAX_COORDINATOR_ADDRESS) and "
            f"process_id (JAX_PROCESS_ID); got {coordinator_address!r}, {process_id!r}"
        )
    platforms = (jax.config.jax_platforms or env.get("JAX_PLATFORMS") or "").split(",")
    if platforms[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=list(local_device_ids) if local_device_ids is not None else None,
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError as e:
        raise ValueError(f"env {name}={os.environ[name]!r} is not an integer") from e


def _cluster_detected() -> bool:
    """Whether one of jax's auto-detected cluster environments (SLURM, TPU, MPI, k8s) describes this job."""
    from jax._src import clusters  # jax exposes no public probe; initialize() itself uses this registry

    if os.environ.get("SLURM_NTASKS") == "1":  # a single-task SLURM job (e.g. salloc + python) is one process
        return False
    return any(not c.opt_in_only_method and c.is_env_present() for c in clusters.ClusterEnv._cluster_types)
