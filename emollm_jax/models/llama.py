"""LLaMA-family decoder (LLaMA, LLaMA-3, Mistral, Qwen2) in Flax NNX, numerically matching Hugging Face.

RoPE uses HF's rotate-half convention so imported q/k weights need no permutation. Attribute names mirror
HF (`model.layers[i].self_attn.q_proj`, ...) so the HF key table below reads row by row.
Decoding uses a functional `KVCache` pytree: the model never mutates hidden state, so generation loops can be
jitted with the cache donated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emollm_jax import sharding
from emollm_jax.models import attention, layers, stack
from emollm_jax.models.layers import RMSNorm
from emollm_jax.models.parts import DecoderConfig, KeyRow, decoder


@decoder("llama")
@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    """LLaMA / Vicuna decoder hyper-parameters (HF `LlamaConfig` names, `num_layers` = num_hidden_layers).

    The other LLaMA-family decoders (`MistralConfig`, `Qwen2Config`, `Llama3Config` below) are the same
    module with other defaults, HF names and chat template. `from_hf`/`to_hf` translate HF config.json dicts.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # frozen HF dict, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...)
    max_position_embeddings: int = 4096
    attention_bias: bool | None = None  # q/k/v biases (o_proj never has one); None: the family's default
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # a key is visible iff query_slot - key_slot < window
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each layer in the backward pass (training memory for compute)
    remat_policy: str = "full"  # with remat: what a layer keeps (models.stack.REMAT_POLICIES)
    scan_layers: bool = False  # one scanned layer over stacked params (models.stack) instead of a loop
    attention: str = "auto"  # auto | plain | blockwise | cudnn (models.attention)

    logical_axes = ("embed", "mlp", "heads", "kv_heads", "vocab", "norm", "layers")
    hf_model_types = ("llama",)
    hf_probe_key = "model.embed_tokens.weight"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    chat_template = "vicuna_v1"  # LLaVA-1.5's Vicuna conversation
    lora_targets = ("q_proj", "v_proj")
    default_attention_bias: ClassVar[bool] = False

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.default_attention_bias)
        super().__post_init__()

    def check(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads"):
            if getattr(self, name) <= 0:
                self.fail(name, "must be positive")
        if self.num_heads % self.num_kv_heads:
            self.fail("num_kv_heads", f"must divide num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            self.fail("num_heads", f"does not divide hidden_size={self.hidden_size}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            self.fail("sliding_window", "must be positive (or None: no window)")
        rope_type = dict(self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            self.fail("rope_scaling", f"rope_type {rope_type!r} is not supported {_ROPE_TYPES}")
        if self.remat_policy not in stack.REMAT_POLICIES:
            self.fail("remat_policy", f"expected one of {tuple(stack.REMAT_POLICIES)}")
        if self.attention not in attention.IMPLEMENTATIONS:
            self.fail("attention", f"expected one of {attention.IMPLEMENTATIONS}")

    @property
    def model_type(self) -> str:
        """The HF `model_type` of this family."""
        return self.hf_model_types[0]

    @property
    def dim_per_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    def build(self, *, rngs: nnx.Rngs) -> LlamaForCausalLM:
        return LlamaForCausalLM(self, rngs=rngs)

    def forward_flops(self, batch: int, seq_len: int) -> float:
        """Matmuls (q/k/v/o, SwiGLU, lm_head) + causal attention for `batch` sequences of `seq_len`."""
        d, hd = self.hidden_size, self.dim_per_head
        attn_w = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp_w = 3 * d * self.intermediate_size
        n_matmul = self.num_layers * (attn_w + mlp_w) + d * self.vocab_size
        tokens = batch * seq_len
        attention = 2.0 * 2.0 * self.num_layers * self.num_heads * hd * seq_len * tokens / 2.0  # causal: half
        return 2.0 * n_matmul * tokens + attention

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Reads an HF config dict (config.json) of this family; accepts both `rope_parameters`
        (transformers>=5) and the older top-level `rope_theta` + `rope_scaling`. Unsupported features raise
        instead of diverging."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
        if hf.get("mlp_bias", False):
            raise ValueError("config mlp_bias=True is not supported")
        if hf.get("pretraining_tp", 1) != 1:
            raise ValueError(f"config pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(dict(hf.get("rope_scaling") or {}))
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if "type" in rope:  # pre-4.45 spelling
            rope.setdefault("rope_type", rope.pop("type"))
        rope_type = rope.get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"config rope_type={rope_type!r} is not supported {_ROPE_TYPES}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("config partial_rotary_factor != 1 is not supported")
        max_pos = int(hf.get("max_position_embeddings", 4096))
        window = cls._hf_window(hf)
        if window is not None and window >= max_pos:
            window = None  # never binds
        heads = int(hf["num_attention_heads"])
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=None if rope_type == "default" else tuple(sorted(rope.items())),
            max_position_embeddings=max_pos,
            attention_bias=bool(hf.get("attention_bias", cls.default_attention_bias)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def _hf_window(cls, hf: Mapping[str, Any]) -> int | None:
        return hf.get("sliding_window")

    def to_hf(self) -> dict[str, Any]:
        """An HF config dict that `AutoConfig.for_model(**d)` / `from_pretrained` reads back as this one."""
        rope = {"rope_type": "default", **(self.rope_scaling_dict or {}), "rope_theta": self.rope_theta}
        return dict(
            architectures=[self.hf_architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.dim_per_head,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=self.param_dtype,
            **self._hf_extra(),
        )

    def _hf_extra(self) -> dict[str, Any]:
        return dict(attention_bias=self.attention_bias, mlp_bias=False)

    def hf_key_table(self) -> list[KeyRow]:
        """HF_KEYS, with the untied head, or with a redundant `lm_head.weight` ignored when tied."""
        head = ("lm_head.weight", "", "ignore") if self.tie_word_embeddings else HF_HEAD
        return [*HF_KEYS, head]


@decoder("mistral")
@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    """Mistral: LLaMA with a sliding attention window."""

    hf_model_types = ("mistral",)
    hf_architecture = "MistralForCausalLM"
    chat_template = "mistral_instruct"  # LLaVA's mistral_instruct: [INST] ... [/INST]

    def _hf_extra(self) -> dict[str, Any]:
        return dict(sliding_window=self.sliding_window)

    def check(self) -> None:
        super().check()
        if self.attention_bias:
            self.fail("attention_bias", "Mistral has no q/k/v biases")


@decoder("qwen2")
@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    """Qwen2: LLaMA with q/k/v biases (and, in the small sizes, tied embeddings)."""

    hf_model_types = ("qwen2",)
    hf_architecture = "Qwen2ForCausalLM"
    chat_template = "chatml"
    default_attention_bias = True

    @classmethod
    def _hf_window(cls, hf: Mapping[str, Any]) -> int | None:
        if hf.get("use_sliding_window", False):
            raise ValueError("Qwen2 use_sliding_window=True is not supported (per-layer windows)")
        return None

    def check(self) -> None:
        super().check()
        if not self.attention_bias:
            self.fail("attention_bias", "Qwen2 always has q/k/v biases")

    def _hf_extra(self) -> dict[str, Any]:
        return dict(use_sliding_window=False, sliding_window=None)


@decoder("llama3")
@dataclasses.dataclass(frozen=True)
class Llama3Config(LlamaConfig):
    """LLaMA-3 (and 3.1): the LLaMA module with rope_theta 500000, a 128k vocabulary, (3.1) llama3 rope
    scaling, and its own chat template (`<|start_header_id|>`...`<|eot_id|>`).

    HF calls it `llama` as well; `hf_match` tells it from LLaMA-2 / Vicuna by what only LLaMA-3 configs say.
    """

    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    chat_template = "llama3"

    @classmethod
    def hf_match(cls, hf: Mapping[str, Any]) -> bool:
        """A `llama` config is LLaMA-3 when any holds: rope_type "llama3" (3.1 and later), a vocabulary of
        128000 or more, or bos_token_id 128000 (<|begin_of_text|>). LLaMA-2 / Vicuna (32000 words, bos 1,
        default rope) meet none of them."""
        if hf.get("model_type") not in cls.hf_model_types:
            return False
        rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
        rope_type = rope.get("rope_type", rope.get("type"))
        return (rope_type == "llama3" or int(hf.get("vocab_size") or 0) >= LLAMA3_MIN_VOCAB
                or hf.get("bos_token_id") == LLAMA3_BOS_ID)


LLAMA3_MIN_VOCAB = 128000  # LLaMA-3's tokenizer: 128000 words + 256 special tokens
LLAMA3_BOS_ID = 128000  # <|begin_of_text|>
_ROPE_TYPES = ("default", "linear", "llama3")

L = "model.layers.{i}."
# HF key -> our nnx.State path, hook. Linear weights are transposed ([out, in] -> [in, out]); q/k need no
# permutation since RoPE uses HF's rotate-half convention. Biases exist only with attention_bias (Qwen2).
# `rotary_emb.inv_freq` (a buffer older transformers saved) is ignored: RoPE is recomputed from the config.
HF_KEYS: list[KeyRow] = [
    ("model.embed_tokens.weight",           "model.embed_tokens.embedding",            "none"),
    (L + "self_attn.q_proj.weight",         L + "self_attn.q_proj.kernel",             "transpose"),
    (L + "self_attn.k_proj.weight",         L + "self_attn.k_proj.kernel",             "transpose"),
    (L + "self_attn.v_proj.weight",         L + "self_attn.v_proj.kernel",             "transpose"),
    (L + "self_attn.o_proj.weight",         L + "self_attn.o_proj.kernel",             "transpose"),
    (L + "self_attn.q_proj.bias",           L + "self_attn.q_proj.bias",               "none"),
    (L + "self_attn.k_proj.bias",           L + "self_attn.k_proj.bias",               "none"),
    (L + "self_attn.v_proj.bias",           L + "self_attn.v_proj.bias",               "none"),
    (L + "mlp.gate_proj.weight",            L + "mlp.gate_proj.kernel",                "transpose"),
    (L + "mlp.up_proj.weight",              L + "mlp.up_proj.kernel",                  "transpose"),
    (L + "mlp.down_proj.weight",            L + "mlp.down_proj.kernel",                "transpose"),
    (L + "input_layernorm.weight",          L + "input_layernorm.weight",              "none"),
    (L + "post_attention_layernorm.weight", L + "post_attention_layernorm.weight",     "none"),
    ("model.norm.weight",                   "model.norm.weight",                       "none"),
    (L + "self_attn.rotary_emb.inv_freq",   "",                                        "ignore"),
]  # fmt: skip
HF_HEAD: KeyRow = ("lm_head.weight", "lm_head.kernel", "transpose")


class KVCache(NamedTuple):
    """Preallocated per-layer keys/values; a pytree, so it passes through `jax.jit` (donate it when decoding).

    k, v: float[L, B, KVH, S_max, Dh] (head-major: a decode step attends over a layer's cache without first
    transposing it); key_mask: int32[B, S_max] (1 = filled, real token);
    index: int32[] number of slots written so far (shared by the batch: prompts are left padded).
    """

    k: jax.Array
    v: jax.Array
    key_mask: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.dim_per_head)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        key_mask=jnp.zeros((batch, max_len), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """float32[Dh/2] inverse frequencies, computed in float32 exactly as HF's rope init functions do."""
    dim = config.dim_per_head
    inv = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)))
    inv = inv.astype(np.float32)
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", "default")
    factor = np.float32(scaling.get("factor", 1.0))
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    if kind == "llama3":
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    if kind == "default":
        return inv
    raise ValueError(f"rope_type={kind!r} is not supported")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """int32[B, T] positions -> (cos, sin) float32[B, T, Dh] in rotate-half layout (frequencies repeated)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: float[B, T, N, Dh]; cos/sin: float32[B, T, Dh]. HF's `x * cos + rotate_half(x) * sin`."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _linear(
    cfg: LlamaConfig, n_in: int, n_out: int, names: tuple[str, str], rngs: nnx.Rngs, bias: bool = False
) -> nnx.Linear:
    return layers.linear(n_in, n_out, names, rngs, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), bias=bias)


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.dim_per_head
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, ("embed", "heads"), rngs, cfg.attention_bias)
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), rngs, cfg.attention_bias)
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), rngs, cfg.attention_bias)
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, ("heads", "embed"), rngs)

    def __call__(self, x, cos, sin, mask: attention.AttentionMask, kv=None):
        """x: float[B, T, D]. Without a cache attends over x itself. With kv = (k_all, v_all, layer,
        index) (caches float[L, B, KVH, S_max, Dh]; `layer` an int or an int32 tracer) writes this chunk's
        keys/values into slot `index` of layer `layer` (in place under jit) and attends over that layer's
        whole cache. Returns (float[B, T, D], (k_all, v_all) or None)."""
        b, t, _ = x.shape
        hd = self.cfg.dim_per_head
        heads = ("batch", "length", "heads", None)
        q = sharding.constrain(self.q_proj(x).reshape(b, t, self.cfg.num_heads, hd), heads)
        k = sharding.constrain(self.k_proj(x).reshape(b, t, self.cfg.num_kv_heads, hd),
                               ("batch", "length", "kv_heads", None))
        v = sharding.constrain(self.v_proj(x).reshape(b, t, self.cfg.num_kv_heads, hd),
                               ("batch", "length", "kv_heads", None))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [B, KVH, T, Dh]
        if kv is not None:
            k_all, v_all, layer, index = kv
            start = (layer, 0, 0, index, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
            k, v = k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype)
            kv = (k_all, v_all)
        out = sharding.constrain(attention.attention(q, k, v, mask), heads).reshape(b, t, -1)
        return sharding.constrain(self.o_proj(out), ("batch", "length", "embed")), kv


class LlamaMLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.up_proj = _linear(cfg, d, f, ("embed", "mlp"), rngs)
        self.down_proj = _linear(cfg, f, d, ("mlp", "embed"), rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = ("batch", "length", "mlp")
        gate = sharding.constrain(jax.nn.silu(self.gate_proj(x)), hidden)
        h = gate * sharding.constrain(self.up_proj(x), hidden)
        return sharding.constrain(self.down_proj(h), ("batch", "length", "embed"))


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = LlamaAttention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = LlamaMLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask: attention.AttentionMask, kv=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaModel(nnx.Module):
    """Embedding, decoder stack and final norm (HF's `model.*`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size,
            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nnx.with_partitioning(layers.NORMAL_002, ("vocab", "embed")), rngs=rngs,
        )
        # an nnx.List of layers, or one layer whose params are stacked [L, ...] (cfg.scan_layers)
        self.layers = stack.build(lambda: LlamaDecoderLayer(cfg, rngs=rngs), cfg.num_layers, cfg.scan_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=jnp.dtype(cfg.dtype),
                            param_dtype=jnp.dtype(cfg.param_dtype))


class LlamaForCausalLM(nnx.Module):
    """Causal LM with HF-compatible numerics; see `__call__` for the cache protocol."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, ("embed", "vocab"), rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int32[B, T] -> float[B, T, D] token embeddings (EmoLLM splices visual tokens into these)."""
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, T, D] final-normed hidden -> float32[B, T, V]."""
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        inputs_embeds: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ):
        """Forward over a chunk of T tokens.

        input_ids int32[B, T] or inputs_embeds float[B, T, D]; attention_mask int[B, T] (1 = real token;
        default all 1). positions default to the count of earlier real tokens (`cumsum(mask) - 1`, clipped
        at 0), counting those already in the cache, so left-padded prompts get unpadded positions.
        segment_ids int32[B, T]: packed rows (several records per row), attention only within equal ids;
        pass the per-record positions with them. Not with a cache.
        Without a cache: returns logits float32[B, T, V] (or the final-normed hidden float[B, T, D] when
        return_hidden). With a cache: the chunk is written at `cache.index` (prefill: the prompt; decode:
        one or a few tokens) and the result is `(logits_or_hidden, new_cache)`.
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(jnp.dtype(cfg.dtype))
        x = sharding.constrain(x, ("batch", "length", "embed"))
        b, t = x.shape[:2]
        mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)

        if cache is None:
            key_mask, query_slots, index = mask, None, None
            seen = jnp.zeros((b,), jnp.int32)
        else:
            index = cache.index
            seen = jnp.sum(cache.key_mask, axis=-1)
            key_mask = jax.lax.dynamic_update_slice(cache.key_mask, mask, (0, index))
            query_slots = index + jnp.arange(t)
        if positions is None:
            positions = jnp.maximum(seen[:, None] + jnp.cumsum(mask, axis=-1) - 1, 0)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
        masking = attention.AttentionMask(query_slots, key_mask, segment_ids, segment_ids, causal=True,
                                          window=cfg.sliding_window)
        masking = attention.prepare(masking, cfg.attention, dtype=cfg.dtype, head_dim=cfg.dim_per_head, t=t,
                                    s=key_mask.shape[1])

        if cache is None:
            def body(layer, x, i):
                return layer(x, cos, sin, masking)[0]

            x, _ = stack.run(self.model.layers, body, x, remat=cfg.remat, policy=cfg.remat_policy)
        else:
            def body(layer, carry, i):  # noqa: F811  (the cache path threads the caches as well)
                x, k_all, v_all = carry
                x, (k_all, v_all) = layer(x, cos, sin, masking, (k_all, v_all, i, index))
                return x, k_all, v_all

            # no remat: it only pays off when training
            (x, k_all, v_all), _ = stack.run(self.model.layers, body, (x, cache.k, cache.v))
        x = self.model.norm(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        return out, KVCache(k=k_all, v=v_all, key_mask=key_mask, index=index + t)
