"""The parts registry: every shipped part declares what it uses; a new part plugs in by registering alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax import data, flops, sharding
from emollm_jax.configuration import ConfigError
from emollm_jax.models import catalog  # noqa: F401
from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig
from emollm_jax.models.llama import LlamaConfig
from emollm_jax.models.parts import (
    AUDIO_TOWERS,
    DECODERS,
    PROJECTORS,
    VISION_TOWERS,
    Preprocessing,
    TowerOutput,
    VisionTowerConfig,
    part_config,
    vision_tower,
)
from emollm_jax.models.projectors import MLPProjectorConfig, MVPConfig
from emollm_jax.models.whisper import WhisperConfig

TINY_TOWER = dict(image_size=32, patch_size=16, hidden_size=16, intermediate_size=32, num_layers=3,
                  num_heads=2)
TINY_TEXT = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                 num_kv_heads=1)


def _names(module: nnx.Module) -> set[str]:
    out = set()
    for _, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out.update(n for n in var.get_metadata().get("out_sharding") or () if n is not None)
    return out


def _instances():
    """A small module of every registered kind, with the names its config declares."""
    for kind, cls in VISION_TOWERS.items():
        if kind == "clip":
            cfg = cls(**TINY_TOWER)
            yield kind, cfg, cfg.build(rngs=nnx.Rngs(0))
    for kind, cls in AUDIO_TOWERS.items():
        if cls is WhisperConfig:
            cfg = cls(num_mel_bins=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      max_source_positions=4)
            yield kind, cfg, cfg.build(rngs=nnx.Rngs(0))
    for kind, cls in DECODERS.items():
        cfg = cls(**TINY_TEXT)
        yield kind, cfg, cfg.build(rngs=nnx.Rngs(0))
    for kind, cls in PROJECTORS.items():
        cfg = cls(levels=(-1, -2)) if cls is MVPConfig else cls()
        yield kind, cfg, cfg.build(8, 12, rngs=nnx.Rngs(0))


def test_parts_declare_the_logical_axes_their_params_carry():
    for kind, cfg, module in _instances():
        assert _names(module) <= set(cfg.logical_axes), (kind, _names(module) - set(cfg.logical_axes))


def test_every_declared_axis_has_a_rule_and_every_rule_is_used():
    declared = {n for _, cls in [*VISION_TOWERS.items(), *AUDIO_TOWERS.items(), *DECODERS.items(),
                                 *PROJECTORS.items()]
                for n in cls.logical_axes}
    rules = {name for name, _ in sharding.DEFAULT_RULES}
    assert declared <= rules, declared - rules
    # `batch` places the data; `lora_rank` is LoRA's adapter axis; every other rule names a parameter axis
    assert rules - declared <= {"batch", "lora_rank"}, rules - declared - {"batch", "lora_rank"}


def test_unknown_kind_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"config\.model\.vision\.kind='vit22b'.*registered: clip"):
        part_config(VISION_TOWERS, {"kind": "vit22b"}, "model.vision")


def test_a_key_no_kind_knows_is_named():
    block = CLIPConfig.block(**TINY_TOWER)
    block.colour_depth = 8
    with pytest.raises(ConfigError, match=r"^config\.model\.vision\.colour_depth: no vision tower"):
        part_config(VISION_TOWERS, block, "model.vision")


def test_field_checks_name_the_config_key():
    block = LlamaConfig.block(**{**TINY_TEXT, "num_kv_heads": 3})
    with pytest.raises(ConfigError, match=r"^config\.model\.text\.num_kv_heads=3: must divide num_heads=2"):
        part_config(DECODERS, block, "model.text")


def test_decoder_kinds_differ_only_where_the_families_differ():
    qwen = part_config(DECODERS, {**TINY_TEXT, "kind": "qwen2"}, "model.text")
    llama = part_config(DECODERS, {**TINY_TEXT, "kind": "llama"}, "model.text")
    assert qwen.attention_bias and not llama.attention_bias  # Qwen2's biases come with the kind
    assert (qwen.chat_template, llama.chat_template) == ("chatml", "vicuna_v1")
    assert qwen.build(rngs=nnx.Rngs(0)).model.layers[0].self_attn.q_proj.bias is not None


# ------------------------------------------------------------------------------------ a part from outside


class _MeanPatchTower(nnx.Module):
    """A stand-in tower: one linear map of each patch's mean colour (no class token)."""

    def __init__(self, cfg, rngs):
        self.cfg = cfg
        self.proj = nnx.Linear(3, cfg.hidden_size, rngs=rngs)

    def __call__(self, pixels):
        n, s, _, c = pixels.shape
        p = self.cfg.patch_size
        patches = pixels.reshape(n, s // p, p, s // p, p, c).mean(axis=(2, 4)).reshape(n, -1, c)
        x = self.proj(patches)
        return TowerOutput((x, x * 2.0), None)


@vision_tower("test_mean_patch")
@dataclasses.dataclass(frozen=True)
class MeanPatchConfig(VisionTowerConfig):
    image_size: int = 16
    patch_size: int = 8
    hidden_size: int = 6

    @property
    def width(self):
        return self.hidden_size

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self):
        return 0

    @property
    def num_hidden_states(self):
        return 2

    def build(self, *, rngs):
        return _MeanPatchTower(self, rngs)

    def preprocessing(self):
        return Preprocessing(self.image_size, "resize", (0.5,) * 3, (0.5,) * 3)

    def forward_flops(self, frames):
        return 2.0 * 3 * self.hidden_size * self.num_patches * frames


def test_a_registered_tower_needs_no_other_change():
    """A new tower is its config class and registration: the config names it, EmoLLM composes it, the
    pipeline takes its preprocessing, FLOPs come from it."""
    import ml_collections

    model = ml_collections.ConfigDict(dict(
        vision=MeanPatchConfig.block(), projector=MLPProjectorConfig.block(),
        text=LlamaConfig.block(**TINY_TEXT), vision_feature_layer=-1, vision_feature_select="full",
        video_pooling="concat"))
    cfg = EmoLLMConfig.from_config(model, vocab_size=40, image_token_id=39)
    assert isinstance(cfg.vision, MeanPatchConfig) and cfg.tokens_per_frame == 4
    emollm = EmoLLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[1] + [39] * 4 + [5, 6]])
    logits = emollm(ids, pixel_values=jnp.ones((1, 16, 16, 3)))
    assert logits.shape == (1, 7, 40) and np.isfinite(np.asarray(logits)).all()
    config = ml_collections.ConfigDict(dict(model=model, seed=0, data=dict(
        template="", num_frames=2, seq_buckets=(), max_len=64, num_workers=0)))
    spec = data.pipeline_spec(config, cfg, sources=("x.jsonl",), tokenizer="t", data_root=".",
                              batch_size=2, training=True)
    assert (spec.image_size, spec.image_mode, spec.image_mean) == (16, "resize", (0.5, 0.5, 0.5))
    assert spec.visual_tokens(2) == 8 and spec.template == "vicuna_v1"
    f = flops.step_flops(cfg, batch=1, seq_len=7, frames=1, projector_params=10, trainable=("projector",))
    assert f.vision == cfg.vision.forward_flops(1)  # frozen tower: forward only


def test_a_projector_that_reads_a_class_token_refuses_a_tower_without_one():
    with pytest.raises(ValueError, match="projector.kind='mvp': reads a class token"):
        EmoLLMConfig(vision=MeanPatchConfig(), projector=MVPConfig(perspectives=("token", "global"),
                                                                    levels=(-1,)),
                     text=LlamaConfig(**TINY_TEXT), image_token_id=39, vision_feature_layer=-1)


def test_mvp_levels_are_asked_of_the_tower():
    mvp = MVPConfig(perspectives=("token", "multilevel"), levels=(-1, -3), fusion="sum")
    cfg = EmoLLMConfig(vision=CLIPConfig(**TINY_TOWER), projector=mvp, text=LlamaConfig(**TINY_TEXT),
                       image_token_id=39)
    model = EmoLLM(cfg, rngs=nnx.Rngs(0))
    pixels = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    feats = model.vision_features(pixels)
    hidden = model.vision(pixels).hidden_states
    assert feats.levels.shape == (2, 2, 4, 16) and feats.cls is None
    np.testing.assert_array_equal(feats.levels[1], hidden[-3][:, 1:])
    with_global = dataclasses.replace(cfg, projector=MVPConfig(levels=(-1,), fusion="sum"))
    feats = EmoLLM(with_global, rngs=nnx.Rngs(0)).vision_features(pixels)
    assert feats.cls.shape == (2, 16)  # the class token is handed over only when asked for
