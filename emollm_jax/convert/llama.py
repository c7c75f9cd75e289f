"""HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM <-> `emollm_jax.models.llama.LlamaForCausalLM`.

The key map is the `_ROWS` table below (HF key, our nnx.State path, hook); `{i}` is the layer index.
Linear weights are transposed ([out, in] -> [in, out]); q/k need no permutation since our RoPE uses HF's
rotate-half convention. Qwen2 adds q/k/v biases; a tied model has no `lm_head` row.

Ignored on load: `model.layers.{i}.self_attn.rotary_emb.inv_freq` (a buffer older transformers saved; we
recompute RoPE from the config) and, when embeddings are tied, a redundant `lm_head.weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from emollm_jax.convert.core import NONE, TRANSPOSE, Family, KeyMap, register_family
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM

L = "model.layers.{i}."
_ROWS = [
    # HF key                             our state path                        hook
    ("model.embed_tokens.weight",        "model.embed_tokens.embedding",       NONE),
    (L + "self_attn.q_proj.weight",      L + "self_attn.q_proj.kernel",        TRANSPOSE),
    (L + "self_attn.k_proj.weight",      L + "self_attn.k_proj.kernel",        TRANSPOSE),
    (L + "self_attn.v_proj.weight",      L + "self_attn.v_proj.kernel",        TRANSPOSE),
    (L + "self_attn.o_proj.weight",      L + "self_attn.o_proj.kernel",        TRANSPOSE),
    (L + "self_attn.q_proj.bias",        L + "self_attn.q_proj.bias",          NONE),  # Qwen2
    (L + "self_attn.k_proj.bias",        L + "self_attn.k_proj.bias",          NONE),  # Qwen2
    (L + "self_attn.v_proj.bias",        L + "self_attn.v_proj.bias",          NONE),  # Qwen2
    (L + "mlp.gate_proj.weight",         L + "mlp.gate_proj.kernel",           TRANSPOSE),
    (L + "mlp.up_proj.weight",           L + "mlp.up_proj.kernel",             TRANSPOSE),
    (L + "mlp.down_proj.weight",         L + "mlp.down_proj.kernel",           TRANSPOSE),
    (L + "input_layernorm.weight",       L + "input_layernorm.weight",         NONE),
    (L + "post_attention_layernorm.weight", L + "post_attention_layernorm.weight", NONE),
    ("model.norm.weight",                "model.norm.weight",                  NONE),
]  # fmt: skip
_HEAD = ("lm_head.weight", "lm_head.kernel", TRANSPOSE)
_IGNORE = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def llama_key_map(config: LlamaConfig) -> KeyMap:
    """The table above for `config` (with or without an untied head), at the top level of the checkpoint.
    Llava-style wrappers reuse it with `.with_prefix("language_model.", "llm.")`."""
    if config.tie_word_embeddings:
        return KeyMap.table(_ROWS, _IGNORE + [r"lm_head\.weight"])
    return KeyMap.table(_ROWS + [_HEAD], _IGNORE)


def _matches(hf: Mapping[str, Any], keys: set[str]) -> bool:
    archs = hf.get("architectures") or []
    known = any(a in ARCHITECTURES for a in archs) or hf.get("model_type") in ("llama", "mistral", "qwen2")
    return known and "model.embed_tokens.weight" in keys


def _build(config: LlamaConfig, rngs: nnx.Rngs) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, rngs=rngs)


LLAMA = register_family(
    Family(
        name="llama",
        matches=_matches,
        config_from_hf=LlamaConfig.from_hf,
        build=_build,
        key_map=lambda config, hf, keys: llama_key_map(config),
        to_hf_config=lambda model: model.config.to_hf(),
        export_map=lambda model: llama_key_map(model.config),
        model_type=LlamaForCausalLM,
        is_lm=True,
    )
)
