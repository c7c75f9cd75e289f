"""EmoLLM composition: splicing visual tokens, padding frames, video pooling, freezing, cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig, check_media_tokens, visual_tokens_per_media
from emollm_jax.models.llama import LlamaConfig, init_cache
from emollm_jax.models.projectors import MLPProjectorConfig, MVPConfig

IMG = 5  # image token id (inside the vocab)
VISION = CLIPConfig(
    image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4
)  # 4 patches / frame
TEXT = LlamaConfig(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


def _cfg(**kw):
    kw.setdefault("projector", MLPProjectorConfig())
    return EmoLLMConfig(vision=VISION, text=TEXT, image_token_id=IMG, **kw)


@pytest.fixture(scope="module")
def model():
    return EmoLLM(_cfg(), rngs=nnx.Rngs(0))


def _pixels(b, k, seed=0):
    return jax.random.normal(jax.random.key(seed), (b, k, 16, 16, 3))


def _ids(rows, length, seed=1):
    """rows: per sample a list of (start, count) image-token spans; other ids random text (never IMG)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, TEXT.vocab_size, size=(len(rows), length)).astype(np.int32)
    for b, spans in enumerate(rows):
        for start, count in spans:
            ids[b, start : start + count] = IMG
    return jnp.asarray(ids)


def test_splice_puts_media_tokens_at_image_positions_in_order(model):
    n = visual_tokens_per_media(model.config, 1)
    assert n == 4
    ids = _ids([[(1, n), (8, n)], [(3, n)], []], 16)
    pv = _pixels(3, 2)
    fm = jnp.array([[0, 1], [0, -1], [-1, -1]])
    out = model.embed_inputs(ids, pv, fm)
    media = model.embed_media(pv, fm)
    text = model.llm.embed(ids)
    np.testing.assert_allclose(out[0, 1:5], media[0, :4], atol=1e-6)
    np.testing.assert_allclose(out[0, 8:12], media[0, 4:8], atol=1e-6)
    np.testing.assert_allclose(out[1, 3:7], media[1, :4], atol=1e-6)
    is_text = np.asarray(ids) != IMG
    np.testing.assert_allclose(np.asarray(out)[is_text], np.asarray(text)[is_text], atol=0)
    # Each image's tokens come from its own frame: the two images of sample 0 differ.
    assert not np.allclose(out[0, 1:5], out[0, 8:12])


def test_no_image_batch_equals_plain_llm(model):
    ids = _ids([[], []], 12)
    mask = jnp.array([[0, 0] + [1] * 10, [1] * 12])
    np.testing.assert_allclose(
        model(ids, attention_mask=mask), model.llm(ids, attention_mask=mask), atol=1e-6
    )
    # A text-only sample inside a batch that has media is also the plain LLM.
    ids2 = _ids([[(2, 4)], []], 12)
    mixed = model(ids2, pixel_values=_pixels(2, 1), frame_media=jnp.array([[0], [-1]]))
    np.testing.assert_allclose(mixed[1], model.llm(ids2[1:])[0], atol=1e-5)


def test_padding_frames_do_not_change_logits(model):
    ids = _ids([[(2, 4)]], 10)
    pv1 = _pixels(1, 1)
    base = model(ids, pixel_values=pv1, frame_media=jnp.array([[0]]))
    junk = jnp.concatenate([pv1, 7.0 * _pixels(1, 2, seed=9)], axis=1)
    padded = model(ids, pixel_values=junk, frame_media=jnp.array([[0, -1, -1]]))
    np.testing.assert_allclose(padded, base, atol=1e-6)
    media = model.embed_media(junk, jnp.array([[0, -1, -1]]))
    assert np.all(np.asarray(media[0, 4:]) == 0)


def test_video_concat_vs_mean():
    concat = EmoLLM(_cfg(video_pooling="concat"), rngs=nnx.Rngs(0))
    mean = EmoLLM(_cfg(video_pooling="mean"), rngs=nnx.Rngs(0))
    assert visual_tokens_per_media(concat.config, 3) == 12
    assert visual_tokens_per_media(mean.config, 3) == 4
    assert visual_tokens_per_media(mean.config, 1) == visual_tokens_per_media(concat.config, 1)
    # Sample 0: a 3-frame video then an image; sample 1: one image and padding.
    pv, fm = _pixels(2, 4), jnp.array([[0, 0, 0, 1], [0, -1, -1, -1]])
    per_frame = concat.embed_media(pv.reshape(8, 1, 16, 16, 3)).reshape(2, 4, 4, -1)
    got_c = concat.embed_media(pv, fm)
    np.testing.assert_allclose(got_c[0], per_frame[0].reshape(16, -1), atol=1e-6)
    got_m = mean.embed_media(pv, fm)
    np.testing.assert_allclose(got_m[0, :4], per_frame[0, :3].mean(0), atol=1e-5)
    np.testing.assert_allclose(got_m[0, 4:8], per_frame[0, 3], atol=1e-6)
    np.testing.assert_allclose(got_m[1, :4], per_frame[1, 0], atol=1e-6)
    # Whole forward with the right number of image tokens for each pooling.
    for m, n_video in ((concat, 12), (mean, 4)):
        ids = _ids([[(1, n_video), (1 + n_video, 4)], [(0, 4)]], n_video + 8)
        assert m(ids, pixel_values=pv, frame_media=fm).shape == (2, n_video + 8, TEXT.vocab_size)


def test_token_count_mismatch_is_an_error(model):
    with pytest.raises(ValueError, match="sample 0: 3 image tokens"):
        model(_ids([[(1, 3)]], 8), pixel_values=_pixels(1, 1))
    with pytest.raises(ValueError, match="sample 0: frame_media"):
        check_media_tokens(model.config, np.full((1, 4), IMG), np.array([[-1, 0]]))


def test_freeze_vision_stops_gradients():
    ids = _ids([[(1, 4)]], 8)
    pv = _pixels(1, 1)

    def vision_grad_norm(freeze):
        m = EmoLLM(_cfg(freeze_vision=freeze), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(m, nnx.Param)

        def loss(params):
            return jnp.mean(nnx.merge(graphdef, params)(ids, pixel_values=pv) ** 2)

        g = jax.grad(loss)(params)
        proj = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["projector"]))
        return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g["vision"])), proj

    frozen, proj = vision_grad_norm(True)
    assert frozen == 0.0 and proj > 0
    assert vision_grad_norm(False)[0] > 0


@pytest.mark.parametrize("fusion,per_frame", [("sum", 4), ("concat", 13)])
def test_mvp_in_the_model(fusion, per_frame):
    m = EmoLLM(_cfg(projector=MVPConfig(fusion=fusion, levels=(-1, -2))), rngs=nnx.Rngs(0))
    assert visual_tokens_per_media(m.config, 1) == per_frame
    ids = _ids([[(0, per_frame)]], per_frame + 3)
    out = m(ids, pixel_values=_pixels(1, 1))
    assert out.shape == (1, per_frame + 3, TEXT.vocab_size) and np.isfinite(np.asarray(out)).all()


def test_full_select_keeps_class_token():
    m = EmoLLM(_cfg(vision_feature_select="full"), rngs=nnx.Rngs(0))
    assert visual_tokens_per_media(m.config, 1) == 5
    assert m.embed_media(_pixels(1, 1)).shape == (1, 5, TEXT.hidden_size)


def test_cache_prefill_matches_full_forward_under_jit(model):
    ids = _ids([[(2, 4)], [(0, 4)]], 9)
    mask = jnp.array([[1] * 9, [0] + [1] * 8])
    pv = _pixels(2, 1)
    full = model(ids, attention_mask=mask, pixel_values=pv)
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, mask, pv):
        cache = init_cache(TEXT, 2, 12)
        return nnx.merge(graphdef, state)(ids, attention_mask=mask, pixel_values=pv, cache=cache)

    logits, cache = prefill(state, ids, mask, pv)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full)[real], atol=1e-5)
    assert int(cache.index) == 9


def test_config_validation():
    with pytest.raises(ValueError, match="vision_feature_layer=-5"):
        _cfg(vision_feature_layer=-5)
    with pytest.raises(ValueError, match="projector.levels=7"):
        _cfg(projector=MVPConfig(levels=(-1, 7)))
    with pytest.raises(ValueError, match="video_pooling"):
        _cfg(video_pooling="max")
