"""Layer stacks, unrolled or scanned: how a part builds and runs its repeated layers, and the two layouts of
their parameters.

Unrolled (`scan_layers=False`): `layers` is an `nnx.List` of modules and the parameters sit under
`layers/0/...`, `layers/1/...`; the forward pass is a Python loop (one compiled copy per layer).
Scanned (`scan_layers=True`): `layers` is ONE module whose every parameter carries a leading layer axis
(logical name `layers`, which the sharding rules map to no mesh axis), float[L, ...] under `layers/...`; the
forward pass is a `jax.lax.scan` over that axis (one compiled layer, whatever the depth). Both forms are
built from the same per-layer initialisation, so a scanned model starts from exactly the stacked weights of
the unrolled one.

`relayout(params, like)` turns a parameter tree of either layout into the layout of `like` (stacking or
unstacking wherever the two differ); checkpoints and converted weights saved in one form load into the other
through it (`emollm_jax.checkpoint.restore_params` and `experiment.load_initial_weights` call it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"  # logical name of a scanned stack's leading axis

# `remat_policy` values of the parts' configs: what a rematerialised layer keeps from its forward pass.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,  # nothing but the layer's input: the whole layer is recomputed in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # every matmul's output (attention products included)
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections' outputs
}


def remat_policy(name: str) -> Callable[..., bool] | None:
    try:
        return REMAT_POLICIES[name]
    except KeyError:
        raise ValueError(f"remat_policy={name!r}: expected one of {tuple(REMAT_POLICIES)}") from None


def build(make: Callable[[], nnx.Module], n: int, scan: bool) -> nnx.Module:
    """`n` layers from `make()` (called n times, in order): an `nnx.List`, or with `scan` one module whose
    parameters are the n layers' stacked along a leading `layers` axis."""
    made = [make() for _ in range(n)]
    if not scan:
        return nnx.List(made)
    graphdef, first = nnx.split(made[0])
    states = [first] + [nnx.split(m)[1] for m in made[1:]]
    flat = [dict(nnx.to_flat_state(s)) for s in states]

    def stacked(path: tuple, var: nnx.Variable) -> nnx.Variable:
        value = jnp.stack([f[path].get_value() for f in flat])
        meta = {}
        names = var.get_metadata().get("out_sharding")
        if names is not None:
            meta["out_sharding"] = (LAYER_AXIS, *names)
        return var.replace(value, **meta)

    state = nnx.from_flat_state([(p, stacked(p, v)) for p, v in nnx.to_flat_state(first)])
    return nnx.merge(graphdef, state)


def is_scanned(stack: nnx.Module) -> bool:
    return not isinstance(stack, nnx.List)


def run(stack: nnx.Module, body: Callable[..., Any], carry: Any, *, remat: bool = False,
        policy: str = "full", collect: bool = False) -> tuple[Any, Any]:
    """Threads `carry` through every layer: `carry = body(layer, carry, i)` for i = 0..L-1.

    Unrolled stacks loop in Python (i a Python int); scanned ones `jax.lax.scan` (i an int32 tracer). With
    `remat` each layer is rematerialised under `policy` (`REMAT_POLICIES`). With `collect`, `body` returns
    (carry, out) and the second result is the tuple of the L outs; else it is None.
    """
    if not is_scanned(stack):
        outs = []
        for i, layer in enumerate(stack):
            if remat:  # i stays a Python int: the remat'd function sees (layer, carry) only
                carry = nnx.remat(lambda m, c, i=i: body(m, c, i), policy=remat_policy(policy))(layer, carry)
            else:
                carry = body(layer, carry, i)
            if collect:
                carry, out = carry
                outs.append(out)
        return carry, (tuple(outs) if collect else None)

    graphdef, state = nnx.split(stack)

    def scan_step(c, xs):
        i, layer_state = xs
        result = body(nnx.merge(graphdef, layer_state), c, i)
        return result if collect else (result, None)

    if remat:  # inside a scan, CSE cannot merge iterations: no need for prevent_cse's barriers
        scan_step = jax.checkpoint(scan_step, policy=remat_policy(policy), prevent_cse=False)
    n = jax.tree.leaves(state)[0].shape[0]
    carry, outs = jax.lax.scan(scan_step, carry, (jnp.arange(n, dtype=jnp.int32), state))
    return carry, (tuple(jax.tree.map(lambda x, i=i: x[i], outs) for i in range(n)) if collect else None)


# -------------------------------------------------------------------------------------- the two layouts


def _is_unrolled(node: Any) -> bool:
    """A mapping keyed 0..n-1 (ints, or their strings as orbax metadata spells them): a layer list."""
    if not isinstance(node, Mapping) or not node:
        return False
    keys = list(node.keys())
    try:
        return sorted(int(k) for k in keys) == list(range(len(keys)))
    except (TypeError, ValueError):
        return False


def _layer_key(node: Mapping, i: int) -> Any:
    return i if i in node else str(i)


def relayout(tree: Any, like: Any, *, stack: Callable[[list[Any]], Any] | None = None,
             unstack: Callable[[Any, int], Any] | None = None, where: str = "") -> Any:
    """`tree` (a nested mapping: pure dict or nnx.State contents) in the layer layout of `like`.

    Where `tree` has a layer list (`layers/0/...`, `layers/1/...`) and `like` a stacked module
    (`layers/...`), the list is stacked (`stack(leaves) -> leaf`, default `jnp.stack`); the other way round
    each layer is sliced out (`unstack(leaf, i)`, default `leaf[i]`). Elsewhere the keys must agree. Leaves of
    `like` are only read for their structure. Returns a pure dict.
    """
    stack = stack or (lambda xs: jnp.stack(xs))
    unstack = unstack or (lambda x, i: x[i])
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if isinstance(like, nnx.State):
        like = nnx.to_pure_dict(like)
    if not isinstance(like, Mapping):
        return tree
    if not isinstance(tree, Mapping):
        raise KeyError(f"{where or '/'}: a leaf where the target has {sorted(map(str, like))}")
    kw = dict(stack=stack, unstack=unstack)
    if _is_unrolled(tree) and not _is_unrolled(like):
        layers = [tree[_layer_key(tree, i)] for i in range(len(tree))]
        merged = jax.tree.map(lambda *xs: stack(list(xs)), *layers)
        return relayout(merged, like, where=where, **kw)
    if _is_unrolled(like) and not _is_unrolled(tree):
        return {k: relayout(jax.tree.map(lambda x, i=int(k): unstack(x, i), tree), like[k],
                            where=f"{where}/{k}", **kw) for k in like}
    mine = {str(k): k for k in tree}
    theirs = {str(k): k for k in like}
    if mine.keys() != theirs.keys():
        raise KeyError(f"{where or '/'}: keys differ: only here {sorted(mine.keys() - theirs.keys())[:5]}, "
                       f"only in the target {sorted(theirs.keys() - mine.keys())[:5]}")
    return {theirs[k]: relayout(tree[mine[k]], like[theirs[k]], where=f"{where}/{k}", **kw) for k in mine}


def relayout_state(params: Any, like: nnx.State) -> nnx.State:
    """`params` (nnx.State or pure dict, either layout) as an nnx.State shaped like `like` (same Variables,
    same metadata), for `nnx.update`."""
    pure = relayout(params, like)
    state = jax.tree.map(lambda x: x, like)  # new Variables (same metadata): `like` stays as it is
    nnx.replace_by_pure_dict(state, pure)
    return state


def _stacked_sharding(sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
    return sharding


def _row_sharding(sharding: Any) -> Any:
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding


def relayout_abstract(target: Any, like: Any) -> Any:
    """`relayout` for a tree of `jax.ShapeDtypeStruct`s: stacked leaves get a leading unsplit axis, rows
    lose it (shardings follow), e.g. a restore target in the layout a checkpoint was saved in."""

    def stack(xs: list[jax.ShapeDtypeStruct]) -> jax.ShapeDtypeStruct:
        x = xs[0]
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=_stacked_sharding(x.sharding))

    def unstack(x: jax.ShapeDtypeStruct, i: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_row_sharding(x.sharding))

    return relayout(target, like, stack=stack, unstack=unstack)
