"""EmoLLM with sound: audio tokens spliced at <audio> positions, the audio projector's pooling, the `audio`
parameter group (Whisper's stored positions never train), FLOPs, sharding and the config block."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax import flops, optim, sharding
from emollm_jax.configuration import ConfigError
from emollm_jax.models.audio_projectors import PoolMLPConfig
from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.emollm import (
    NO_AUDIO,
    EmoLLM,
    EmoLLMConfig,
    audio_tokens_per_item,
    check_audio_tokens,
)
from emollm_jax.models.llama import LlamaConfig
from emollm_jax.models.projectors import MLPProjectorConfig
from emollm_jax.models.whisper import WhisperConfig
from emollm_jax.pytree import flat_leaves

IMG, AUD = 5, 6  # image and audio token ids (inside the vocab)
VISION = CLIPConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4)  # 4 visual tokens per image
TEXT = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2)
AUDIO = WhisperConfig(num_mel_bins=8, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      max_source_positions=8)  # windows of 16 mel frames -> 8 embeddings
MELS, FRAMES = 8, 16


def _cfg(**kw):
    kw.setdefault("audio_projector", PoolMLPConfig(tokens_per_window=4))
    return EmoLLMConfig(vision=VISION, projector=MLPProjectorConfig(), text=TEXT, image_token_id=IMG,
                        audio=AUDIO, audio_token_id=AUD, **kw)


@pytest.fixture(scope="module")
def model():
    return EmoLLM(_cfg(), rngs=nnx.Rngs(0))


def _mels(b, a, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, a, MELS, FRAMES))


def _ids(rows, length, seed=1):
    """rows: per sample a list of (start, count, id) spans; other ids random text (never IMG or AUD)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(7, TEXT.vocab_size, size=(len(rows), length)).astype(np.int32)
    for b, spans in enumerate(rows):
        for start, count, tid in spans:
            ids[b, start : start + count] = tid
    return jnp.asarray(ids)


def test_audio_tokens_go_to_audio_positions_in_window_order(model):
    k = model.config.audio_tokens_per_window
    assert k == 4 and audio_tokens_per_item(model.config, 2) == 8
    # sample 0: one sound of two windows; sample 1: one window and a padding slot; sample 2: no sound
    ids = _ids([[(2, 2 * k, AUD)], [(5, k, AUD)], []], 16)
    mels = _mels(3, 2)
    am = jnp.array([[0, 0], [0, -1], [-1, -1]])
    out = model.embed_inputs(ids, audio_features=mels, audio_media=am)
    tokens = model.embed_audio(mels, am)
    assert tokens.shape == (3, 2 * k, TEXT.hidden_size)
    np.testing.assert_allclose(out[0, 2:10], tokens[0], atol=1e-6)
    np.testing.assert_allclose(out[1, 5:9], tokens[1, :k], atol=1e-6)
    np.testing.assert_array_equal(tokens[1, k:], 0.0)  # the padding slot
    is_text = np.asarray(ids) != AUD
    np.testing.assert_allclose(np.asarray(out)[is_text], np.asarray(model.llm.embed(ids))[is_text], atol=0)
    # each window's tokens come from its own features
    assert not np.allclose(out[0, 2:6], out[0, 6:10])
    solo = model.embed_audio(mels[:1, 1:])  # window 2 of sample 0 alone
    np.testing.assert_allclose(tokens[0, k:], solo[0], atol=1e-5)


def test_image_and_audio_in_one_sample_each_take_their_own_tokens(model):
    ids = _ids([[(1, 4, IMG), (7, 4, AUD)]], 14)
    pv, mels = jax.random.normal(jax.random.key(3), (1, 1, 16, 16, 3)), _mels(1, 1)
    out = model.embed_inputs(ids, pv, None, mels, None)
    np.testing.assert_allclose(out[0, 1:5], model.embed_media(pv)[0], atol=1e-6)
    np.testing.assert_allclose(out[0, 7:11], model.embed_audio(mels)[0], atol=1e-6)
    logits = model(ids, pixel_values=pv, audio_features=mels)
    assert logits.shape == (1, 14, TEXT.vocab_size) and np.isfinite(np.asarray(logits)).all()
    # The sound changes the answer's logits; text-only rows are the plain LLM.
    other = model(ids, pixel_values=pv, audio_features=_mels(1, 1, seed=9))
    assert not np.allclose(logits[0, -1], other[0, -1])


def test_an_out_of_vocab_audio_id_is_never_embedded():
    cfg = dataclasses.replace(_cfg(), audio_token_id=-201)
    model = EmoLLM(cfg, rngs=nnx.Rngs(0))
    ids = _ids([[(2, 4, -201)]], 9)
    out = model.embed_inputs(ids, audio_features=_mels(1, 1))
    np.testing.assert_allclose(out[0, 2:6], model.embed_audio(_mels(1, 1))[0], atol=1e-6)


def test_token_count_mismatch_is_named(model):
    ids = _ids([[(1, 4, AUD)], [(1, 3, AUD)]], 10)
    with pytest.raises(ValueError, match=r"sample 1: 3 audio tokens \(id 6\).*gives 4 audio tokens"):
        model.embed_inputs(ids, audio_features=_mels(2, 1))
    with pytest.raises(ValueError, match="audio_media .* must be non-decreasing"):
        check_audio_tokens(model.config, np.asarray(ids[:1]), np.array([[-1, 0]]))
    no_audio = dataclasses.replace(_cfg(), audio=None, audio_projector=None, audio_token_id=None)
    with pytest.raises(ValueError, match="no audio tower"):
        check_audio_tokens(no_audio, np.asarray(ids[:1]), np.array([[0]]))
    with pytest.raises(ValueError, match="no audio tower"):
        EmoLLM(no_audio, rngs=nnx.Rngs(0)).embed_audio(_mels(1, 1))


def test_pooling_modes():
    x = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
    for pooling, din in (("mean", 3), ("max", 3), ("stack", 6)):
        cfg = PoolMLPConfig(tokens_per_window=4, pooling=pooling)
        proj = cfg.build(3, 5, 8, rngs=nnx.Rngs(0))
        assert proj.linear_1.kernel.shape == (din, 5)
        groups = np.asarray(x).reshape(2, 4, 2, 3)
        pooled = {"mean": groups.mean(2), "max": groups.max(2), "stack": groups.reshape(2, 4, 6)}[pooling]
        want = proj.linear_2(jax.nn.gelu(proj.linear_1(jnp.asarray(pooled)), approximate=False))
        np.testing.assert_allclose(proj(x), want, rtol=1e-6)
        assert cfg.forward_flops(3, 5, 8, windows=2) == 2.0 * 2 * 4 * (din * 5 + 5 * 5)


def _config_block(**audio):
    return ml_collections.ConfigDict(dict(
        vision=CLIPConfig.block(**dataclasses.asdict(VISION)), projector=MLPProjectorConfig.block(),
        text=LlamaConfig.block(**{**dataclasses.asdict(TEXT), "vocab_size": 0}), vision_feature_layer=-2,
        vision_feature_select="patch", video_pooling="concat", **audio))


def test_config_block_names_a_registered_audio_tower_or_none():
    base = _config_block()
    assert EmoLLMConfig.from_config(base, vocab_size=50, image_token_id=IMG).audio is None
    off = _config_block(audio=dict(WhisperConfig.block(), kind=NO_AUDIO))
    assert EmoLLMConfig.from_config(off, vocab_size=50, image_token_id=IMG, audio_token_id=AUD).audio is None
    on = _config_block(audio=WhisperConfig.block(**dataclasses.asdict(AUDIO)),
                       audio_projector=PoolMLPConfig.block(tokens_per_window=2, pooling="stack"))
    cfg = EmoLLMConfig.from_config(on, vocab_size=50, image_token_id=IMG, audio_token_id=AUD)
    assert cfg.audio == AUDIO and cfg.audio_tokens_per_window == 2 and cfg.audio_projector.pooling == "stack"
    with pytest.raises(ConfigError, match=r"config\.model\.audio\.kind='hubert': unknown audio tower; "
                                          r"registered: whisper"):
        EmoLLMConfig.from_config(_config_block(audio={"kind": "hubert"}), vocab_size=50, image_token_id=IMG,
                                 audio_token_id=AUD)
    with pytest.raises(ConfigError, match=r"config\.model\.audio_projector: missing block"):
        EmoLLMConfig.from_config(_config_block(audio=WhisperConfig.block()), vocab_size=50,
                                 image_token_id=IMG, audio_token_id=AUD)
    bad = _config_block(audio=WhisperConfig.block(**dataclasses.asdict(AUDIO)),
                        audio_projector=PoolMLPConfig.block(tokens_per_window=3))
    with pytest.raises(ConfigError, match=r"config\.model\.audio_projector\.tokens_per_window=3: .*does not "
                                          r"divide the tower's 8 frames"):
        EmoLLMConfig.from_config(bad, vocab_size=50, image_token_id=IMG, audio_token_id=AUD)
    with pytest.raises(ConfigError, match=r"config\.model\.audio_token_id=5: .*not the image token id"):
        EmoLLMConfig.from_config(on, vocab_size=50, image_token_id=IMG, audio_token_id=IMG)
    with pytest.raises(ConfigError, match=r"config\.model\.audio_projector\.pooling='median'"):
        EmoLLMConfig.from_config(_config_block(audio=WhisperConfig.block(**dataclasses.asdict(AUDIO)),
                                               audio_projector=PoolMLPConfig.block(pooling="median")),
                                 vocab_size=50, image_token_id=IMG, audio_token_id=AUD)


def test_a_model_without_sound_is_unchanged_by_the_audio_parts(model):
    """The audio parts are built last: vision, projector and decoder draw the same initial weights."""
    plain = EmoLLM(dataclasses.replace(_cfg(), audio=None, audio_projector=None, audio_token_id=None),
                   rngs=nnx.Rngs(0))
    assert plain.audio is None and plain.audio_projector is None
    mine = flat_leaves(nnx.state(model, nnx.Param))
    for key, value in flat_leaves(nnx.state(plain, nnx.Param)).items():
        np.testing.assert_array_equal(value, mine[key], err_msg=key)
    assert {k.split("/")[0] for k in mine} - {k.split("/")[0] for k in flat_leaves(nnx.state(plain))} == {
        "audio", "audio_projector"}


def _loss_grads(model, freeze_audio):
    model = EmoLLM(dataclasses.replace(model.config, freeze_audio=freeze_audio), rngs=nnx.Rngs(0))
    ids = _ids([[(1, 4, AUD)]], 8)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest)(ids, audio_features=_mels(1, 1))[0, -1].sum()

    return params, jax.grad(loss)(params)


def test_freeze_audio_stops_gradients_at_the_tower(model):
    _, frozen = _loss_grads(model, True)
    _, trained = _loss_grads(model, False)
    tower = lambda g: max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g["audio"]))  # noqa: E731
    assert tower(frozen) == 0.0 and tower(trained) > 0.0
    assert float(jnp.abs(frozen["audio_projector"]["linear_1"]["kernel"][...]).max()) > 0.0
    # the stored positions sit behind stop_gradient either way
    assert float(jnp.abs(trained["audio"]["embed_positions"][...]).max()) == 0.0


def test_audio_group_trains_per_stage_and_the_positions_never(model):
    params, grads = _loss_grads(model, False)
    labels = flat_leaves(optim.group_labels(params))
    assert labels["audio/conv1/kernel"] == "audio"
    assert labels["audio_projector/linear_1/kernel"] == "projector"
    assert labels["audio/embed_positions"] == optim.FIXED
    assert flat_leaves(optim.decay_mask(params))["audio/embed_positions"] is False
    stage = dict(trainable=("audio", "projector"), lr=1e-2, weight_decay=0.5, grad_clip=1.0)
    opt = optim.make_optimizer(stage, params, total_steps=10)
    state = opt.tx.init(params)
    updates, _ = opt.tx.update(grads, state, params)
    moved = {k: float(jnp.abs(v).max()) for k, v in flat_leaves(updates).items()}
    assert moved["audio/conv1/kernel"] > 0 and moved["audio_projector/linear_1/kernel"] > 0
    assert moved["audio/embed_positions"] == 0.0  # frozen although weight decay would shrink a 2-D param
    assert moved["llm/model/embed_tokens/embedding"] == 0.0  # llm not in this stage
    # frozen groups hold no optimizer state: the positions' and the decoder's moments are absent
    state_sizes = sum(x.size for x in jax.tree.leaves(state) if hasattr(x, "size"))
    trainable = sum(v.size for k, v in flat_leaves(params).items()
                    if labels[k] in ("audio", "projector"))
    assert state_sizes < 2 * trainable + 10
    vision_only = optim.make_optimizer(dict(trainable=("vision",), lr=1e-2), params, total_steps=10)
    updates, _ = vision_only.tx.update(grads, vision_only.tx.init(params), params)
    assert float(jnp.abs(flat_leaves(updates)["audio/conv1/kernel"]).max()) == 0.0
    no_audio = EmoLLM(dataclasses.replace(_cfg(), audio=None, audio_projector=None, audio_token_id=None),
                      rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="names group 'audio', but no parameter belongs to it"):
        optim.make_optimizer(stage, nnx.state(no_audio, nnx.Param), total_steps=10)
    assert optax  # the optimizer above is optax's multi_transform


def test_flops_count_the_audio_parts(model):
    cfg = dataclasses.replace(model.config, freeze_audio=False)
    kw = dict(batch=2, seq_len=16, frames=2, projector_params=100)
    trained = flops.step_flops(cfg, trainable=("audio", "projector", "llm"), audio_windows=3, **kw)
    fwd = AUDIO.forward_flops(3)
    assert trained.audio == 3 * fwd
    assert trained.audio_projector == 3 * cfg.audio_projector.forward_flops(16, 32, 8, 3)
    frozen = flops.step_flops(model.config, trainable=("projector", "llm"), audio_windows=3, **kw)
    assert frozen.audio == fwd  # forward only behind stop_gradient
    assert frozen.total - frozen.audio - frozen.audio_projector == pytest.approx(
        flops.step_flops(model.config, trainable=("projector", "llm"), **kw).total)
    assert flops.step_flops(model.config, trainable=("llm",), audio_windows=0, **kw).audio == 0.0


def test_audio_parts_shard_by_their_logical_names(model):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = flat_leaves(sharding.logical_shardings(nnx.state(model, nnx.Param), mesh))
    assert shardings["audio/layers/0/fc1/kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert shardings["audio/embed_positions"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert shardings["audio_projector/linear_1/kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")


# ------------------------------------------------------------------------------------- weights in and out


def _init(**paths):
    return ml_collections.ConfigDict({"init": {"hf": "", "llm": "", "vision": "", "audio": "", "params": "",
                                               **paths}})


def _params(module):
    return {k: np.asarray(v) for k, v in flat_leaves(nnx.state(module, nnx.Param)).items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_init_audio_loads_a_whisper_checkpoint_into_the_tower(tmp_path):
    from test_whisper import _encoder, make_hf

    from emollm_jax import experiment
    from emollm_jax.convert import load_hf

    make_hf(tmp_path / "whisper", "WhisperForConditionalGeneration", _encoder(8, 16, 1, 2, 32, 8))
    model = EmoLLM(_cfg(), rngs=nnx.Rngs(0))
    before = {part: _params(getattr(model, part)) for part in ("llm", "vision", "audio_projector")}
    experiment.load_initial_weights(_init(audio=str(tmp_path / "whisper")), model)
    _same(_params(model.audio), _params(load_hf(tmp_path / "whisper")))
    for part, params in before.items():  # nothing else moved
        _same(_params(getattr(model, part)), params)
    deaf = EmoLLM(dataclasses.replace(_cfg(), audio=None, audio_projector=None, audio_token_id=None),
                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="config.init.audio=.*the model has no audio tower"):
        experiment.load_initial_weights(_init(audio=str(tmp_path / "whisper")), deaf)


def test_params_checkpoints_carry_the_audio_parts(tmp_path, model):
    """A training or params-only checkpoint holds the audio tower and projector: restored into a fresh model
    (init.params, or evaluation's latest checkpoint) it gives the same answers to a sound."""
    from emollm_jax import checkpoint, experiment

    checkpoint.save_params(tmp_path / "params", nnx.state(model, nnx.Param))
    other = EmoLLM(model.config, rngs=nnx.Rngs(7))
    assert not np.allclose(_params(other.audio)["conv1/kernel"], _params(model.audio)["conv1/kernel"])
    experiment.load_initial_weights(_init(params=str(tmp_path / "params")), other)
    _same(_params(other), _params(model))
    ids = _ids([[(1, 4, AUD)]], 8)
    sound = _mels(1, 1)
    np.testing.assert_array_equal(other(ids, audio_features=sound), model(ids, audio_features=sound))


def test_a_llava_checkpoint_gives_its_parts_and_the_audio_parts_start_fresh(tmp_path, model):
    from emollm_jax import experiment
    from emollm_jax.convert import save_hf

    with pytest.raises(ValueError, match="HF Llava has no audio tower"):
        save_hf(model, tmp_path / "nope")
    plain = EmoLLM(dataclasses.replace(_cfg(), audio=None, audio_projector=None, audio_token_id=None),
                   rngs=nnx.Rngs(3))
    save_hf(plain, tmp_path / "llava")
    fresh = EmoLLM(_cfg(), rngs=nnx.Rngs(0))
    audio_before = _params(fresh.audio)
    experiment.load_initial_weights(_init(), fresh, init_from=str(tmp_path / "llava"))
    for part in ("llm", "vision", "projector"):
        _same(_params(getattr(fresh, part)), _params(getattr(plain, part)))
    _same(_params(fresh.audio), audio_before)
