"""Vision -> text projectors: LLaVA-1.5's ``mlp2x_gelu``, ``linear``, and MVP.

MVP (Multi-perspective Visual Projection) is named by the EmoLLM paper, but its equations are not published.
**The formulation below is this project's own** (a reimplementation choice, not taken from the paper): K
perspectives over the vision tower's features, each projecting to the LLM width D, then fused.

Notation: patches X in R^{P x Dv} of the selected tower layer (per image), levels X^(l) for l in ``levels``,
class token c in R^{Dv}; MLP(.) = Linear -> GELU -> Linear (LLaVA-1.5's projector). A projector asks the
tower for what it reads (``feature_levels()``, ``needs_class_token``) and gets it as ``VisualFeatures``.

1. token:      Y_tok = MLP_tok(X)                                                      [P, D]
2. relation:   S_ij = <x_i, x_j> / (max(|x_i|, eps) max(|x_j|, eps))   (cosine; 0 for a zero vector)
               A = 1[S > tau] OR I        (hard threshold plus self loops; no gradient flows through A)
               Â = D^-1/2 A D^-1/2,  D = diag(rowsum A) >= 1, so no division by zero
               H_0 = X,  H_{k+1} = GELU(Â H_k W_k + b_k)   for k < gcn_layers
               Y_rel = MLP_rel(H_gcn_layers)                                           [P, D]
   tau = 1.01 gives A = I (each token alone); tau = -1.01 gives the complete graph (every row of Â is a mean).
3. multilevel: Z = sum_l softmax(alpha)_l LN_l(X^(l)),  alpha learned (zero init: a plain mean)
               Y_ml = MLP_ml(Z)                                                        [P, D]
4. global:     g = MLP_glob(c)   c = class token (or the patches' mean, ``global_pool="mean"``)  [1, D]

Fusion (``Y_glob`` is broadcast over the P tokens for the two sum fusions, so it adds no tokens):
- ``sum``:       Y = sum_k Y_k                                                         [P, D]
- ``gated_sum``: Y = sum_k g_k * Y_k,  g_k(t) = K softmax_k(<w_k, Y_k(t)> + b_k)  per token t
                 (w, b zero-initialised, so it starts equal to ``sum``; the gates then learn which perspective
                 to trust for each token)                                              [P, D]
- ``concat``:    Y = [Y_tok; Y_rel; Y_ml; g] along the token axis (global adds 1 token)
                                                                          [P * K_patch + K_glob, D]
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from emollm_jax.models import layers
from emollm_jax.models.parts import KeyRow, ProjectorConfig, VisualFeatures, projector

PERSPECTIVES = ("token", "relation", "multilevel", "global")
FUSIONS = ("sum", "gated_sum", "concat")
_COS_EPS = 1e-6


@projector("mlp2x_gelu")
@dataclasses.dataclass(frozen=True)
class MLPProjectorConfig(ProjectorConfig):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear per patch token (HF Llava's
    `multi_modal_projector`)."""

    logical_axes = ("proj_in", "proj_hidden", "proj_out")

    def build(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> MLPProjector:
        return MLPProjector(din, dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def hf_key_table(self) -> list[KeyRow]:
        """HF Llava's rows (after the `multi_modal_projector.` prefix)."""
        return [("linear_1.weight", "linear_1.kernel", "transpose"),
                ("linear_1.bias", "linear_1.bias", "none"),
                ("linear_2.weight", "linear_2.kernel", "transpose"),
                ("linear_2.bias", "linear_2.bias", "none")]

    def original_llava_key_table(self) -> list[KeyRow]:
        """Original LLaVA's `model.mm_projector` nn.Sequential (index 1 is the GELU)."""
        return [("0.weight", "linear_1.kernel", "transpose"), ("0.bias", "linear_1.bias", "none"),
                ("2.weight", "linear_2.kernel", "transpose"), ("2.bias", "linear_2.bias", "none")]


@projector("linear")
@dataclasses.dataclass(frozen=True)
class LinearProjectorConfig(ProjectorConfig):
    """LLaVA-1's single linear projection."""

    logical_axes = ("proj_in", "proj_out")

    def build(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> LinearProjector:
        return LinearProjector(din, dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def original_llava_key_table(self) -> list[KeyRow]:
        return [("weight", "linear.kernel", "transpose"), ("bias", "linear.bias", "none")]


@projector("mvp")
@dataclasses.dataclass(frozen=True)
class MVPConfig(ProjectorConfig):
    """Multi-perspective visual projection (this project's formulation, see the module docstring); the fields
    are the paper's ablation knobs."""

    perspectives: tuple[str, ...] = PERSPECTIVES
    tau: float = 0.5  # relational graph: edge where cosine similarity > tau (>= 1: self loops only)
    gcn_layers: int = 1
    levels: tuple[int, ...] = (-2, -6, -10)  # tower hidden_states indices for the multi-level perspective
    fusion: str = "gated_sum"  # "sum" | "gated_sum" | "concat"
    global_pool: str = "cls"  # "cls" (class token) | "mean" (mean of the patch tokens)

    logical_axes = ("proj_in", "proj_hidden", "proj_out", "norm")

    def check(self) -> None:
        object.__setattr__(self, "levels", tuple(int(i) for i in self.levels))
        unknown = [p for p in self.perspectives if p not in PERSPECTIVES]
        if not self.perspectives or unknown or len(set(self.perspectives)) != len(self.perspectives):
            self.fail("perspectives", f"expected a non-empty subset of {PERSPECTIVES} without repeats")
        if self.fusion not in FUSIONS:
            self.fail("fusion", f"expected one of {FUSIONS}")
        if self.fusion != "concat" and self.perspectives == ("global",):
            self.fail("perspectives", f"fusion={self.fusion!r} needs a per-patch perspective to add the "
                      "global one to")
        if not -2.0 <= self.tau <= 2.0:  # cosine lies in [-1, 1]: beyond +-1 the graph is empty or complete
            self.fail("tau", "cosine threshold outside [-2, 2] (tau >= 1: no edges, tau < -1: every edge)")
        if self.gcn_layers < 1:
            self.fail("gcn_layers", "expected >= 1")
        if "multilevel" in self.perspectives and not self.levels:
            self.fail("levels", "the multilevel perspective needs at least one tower layer index")
        if self.global_pool not in ("cls", "mean"):
            self.fail("global_pool", "expected 'cls' or 'mean'")

    def build(self, din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any = None,
              param_dtype: Any = jnp.float32) -> MVPProjector:
        return MVPProjector(self, din, dout, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def feature_levels(self) -> tuple[int, ...]:
        return self.levels if "multilevel" in self.perspectives else ()

    @property
    def needs_class_token(self) -> bool:
        return "global" in self.perspectives and self.global_pool == "cls"

    def num_output_tokens(self, num_patches: int) -> int:
        if self.fusion != "concat":
            return num_patches
        per_patch = sum(p != "global" for p in self.perspectives)
        return per_patch * num_patches + ("global" in self.perspectives)


def _linear(din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs, **kw: Any) -> nnx.Linear:
    return layers.linear(din, dout, names, rngs, init=layers.LECUN_NORMAL, **kw)


class Mlp2xGelu(nnx.Module):
    """Linear -> GELU (exact erf form, as HF's "gelu") -> Linear.

    Attribute names match HF Llava's ``multi_modal_projector.linear_{1,2}`` so the key table is direct.
    """

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        self.linear_1 = _linear(din, dout, ("proj_in", "proj_hidden"), rngs, **kw)
        self.linear_2 = _linear(dout, dout, ("proj_hidden", "proj_out"), rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[..., Dv] -> float[..., D]."""
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class LinearProjector(nnx.Module):
    """LLaVA-1's single linear projection."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        self.linear = _linear(din, dout, ("proj_in", "proj_out"), rngs, **kw)

    def __call__(self, features: VisualFeatures) -> jax.Array:
        """features.patches float[N, P, Dv] -> float[N, P, D]."""
        return self.linear(features.patches)


class MLPProjector(Mlp2xGelu):
    """``mlp2x_gelu`` applied per patch token (params ``linear_1``, ``linear_2`` at the top level)."""

    def __call__(self, features: VisualFeatures) -> jax.Array:
        """features.patches float[N, P, Dv] -> float[N, P, D]."""
        return super().__call__(features.patches)


def similarity_graph(x: jax.Array, tau: float) -> jax.Array:
    """Symmetrically normalised adjacency of the thresholded cosine-similarity graph.

    Args:
      x: float[N, P, Dv] patch features.
      tau: edge where cosine similarity > tau; self loops always present.
    Returns:
      float32[N, P, P] Â = D^-1/2 A D^-1/2. A is a hard threshold: it carries no gradient (stop_gradient makes
      that explicit). Zero vectors get cosine 0 with everything (norms are clamped at eps), never NaN.
    """
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _COS_EPS)
    sim = jnp.einsum("npd,nqd->npq", xn, xn)
    eye = jnp.eye(x.shape[1], dtype=bool)
    adj = ((sim > tau) | eye).astype(jnp.float32)
    inv_sqrt_deg = jax.lax.rsqrt(adj.sum(-1))  # rowsum >= 1 thanks to the self loop
    return adj * inv_sqrt_deg[:, :, None] * inv_sqrt_deg[:, None, :]


class RelationPerspective(nnx.Module):
    """GCN over the patch-similarity graph, then an MLP to the text width."""

    def __init__(self, din: int, dout: int, *, tau: float, num_layers: int, rngs: nnx.Rngs, **kw: Any):
        self.tau = tau
        self.gcn = nnx.List(
            [_linear(din, din, ("proj_in", "proj_hidden"), rngs, **kw) for _ in range(num_layers)]
        )
        self.mlp = Mlp2xGelu(din, dout, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """float[N, P, Dv] -> float[N, P, D]."""
        adj = similarity_graph(x, self.tau).astype(x.dtype)
        h = x
        for layer in self.gcn:
            h = jax.nn.gelu(layer(jnp.einsum("npq,nqd->npd", adj, h)), approximate=False)
        return self.mlp(h)


class MultiLevelPerspective(nnx.Module):
    """Per-level LayerNorm, learned softmax mixture over ViT layers, then an MLP."""

    def __init__(self, num_levels: int, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        ln_kw = {k: v for k, v in kw.items() if k in ("dtype", "param_dtype")}
        self.norms = nnx.List(
            [
                layers.layer_norm(din, 1e-5, rngs, names=("proj_in",), fast_variance=True, **ln_kw)
                for _ in range(num_levels)
            ]
        )
        self.level_logits = nnx.Param(
            jnp.zeros((num_levels,), kw.get("param_dtype", jnp.float32)), out_sharding=("norm",)
        )
        self.mlp = Mlp2xGelu(din, dout, rngs=rngs, **kw)

    def __call__(self, levels: jax.Array) -> jax.Array:
        """float[L, N, P, Dv] -> float[N, P, D]."""
        if levels.shape[0] != len(self.norms):
            raise ValueError(
                f"multilevel perspective: got {levels.shape[0]} levels, built for {len(self.norms)}"
            )
        w = jax.nn.softmax(self.level_logits[...].astype(jnp.float32)).astype(levels.dtype)
        mixed = sum(w[i] * norm(levels[i]) for i, norm in enumerate(self.norms))
        return self.mlp(mixed)


class MVPProjector(nnx.Module):
    """Multi-perspective visual projection (this project's formulation; see the module docstring)."""

    def __init__(self, cfg: MVPConfig, din: int, dout: int, *, rngs: nnx.Rngs, **kw: Any):
        self.cfg = cfg
        ps = cfg.perspectives
        self.token = Mlp2xGelu(din, dout, rngs=rngs, **kw) if "token" in ps else None
        self.relation = (
            RelationPerspective(din, dout, tau=cfg.tau, num_layers=cfg.gcn_layers, rngs=rngs, **kw)
            if "relation" in ps
            else None
        )
        self.multilevel = (
            MultiLevelPerspective(len(cfg.levels), din, dout, rngs=rngs, **kw) if "multilevel" in ps else None
        )
        self.global_ = Mlp2xGelu(din, dout, rngs=rngs, **kw) if "global" in ps else None
        if cfg.fusion == "gated_sum":
            pdt = kw.get("param_dtype", jnp.float32)
            self.gate_w = nnx.Param(jnp.zeros((len(ps), dout), pdt), out_sharding=(None, "proj_out"))
            self.gate_b = nnx.Param(jnp.zeros((len(ps),), pdt), out_sharding=(None,))

    def perspectives(self, features: VisualFeatures) -> dict[str, jax.Array]:
        """Each perspective's output: float[N, P, D] per patch perspective, float[N, 1, D] for "global"."""
        x = features.patches
        out = {}
        for name in self.cfg.perspectives:
            if name == "token":
                out[name] = self.token(x)
            elif name == "relation":
                out[name] = self.relation(x)
            elif name == "multilevel":
                out[name] = self.multilevel(features.levels)
            else:
                pooled = features.cls if self.cfg.global_pool == "cls" else x.mean(axis=1)
                out[name] = self.global_(pooled)[:, None, :]
        return out

    def __call__(self, features: VisualFeatures) -> jax.Array:
        """patches float[N, P, Dv], levels float[L, N, P, Dv], cls float[N, Dv] -> float[N, P', D]."""
        ys = self.perspectives(features)
        if self.cfg.fusion == "concat":
            return jnp.concatenate([ys[p] for p in self.cfg.perspectives], axis=1)
        stacked = _stack(ys, features.patches.shape[1])
        if self.cfg.fusion == "sum":
            return stacked.sum(0)
        gates = self._gates(stacked)
        return jnp.einsum("knp,knpd->npd", gates.astype(stacked.dtype), stacked)

    def gates(self, features: VisualFeatures) -> jax.Array:
        """`gated_sum`'s weights float32[K, N, P]: perspective k's factor at each visual token, in the order
        of `perspectives` (they sum to K over k; all 1 at initialisation)."""
        if self.cfg.fusion != "gated_sum":
            raise ValueError(f"fusion={self.cfg.fusion!r} has no gates (only 'gated_sum')")
        return self._gates(_stack(self.perspectives(features), features.patches.shape[1]))

    def _gates(self, stacked: jax.Array) -> jax.Array:
        """float[K, N, P, D] -> float32[K, N, P], K softmax_k(<w_k, Y_k(t)> + b_k)."""
        logits = jnp.einsum("knpd,kd->knp", stacked, self.gate_w[...].astype(stacked.dtype))
        logits = logits.astype(jnp.float32) + self.gate_b[...].astype(jnp.float32)[:, None, None]
        return stacked.shape[0] * jax.nn.softmax(logits, axis=0)


def _stack(ys: dict[str, jax.Array], num_patches: int) -> jax.Array:
    """Perspective outputs (float[N, P, D], or float[N, 1, D] for "global") -> float[K, N, P, D]."""
    return jnp.stack([jnp.broadcast_to(y, (y.shape[0], num_patches, y.shape[2])) for y in ys.values()])
