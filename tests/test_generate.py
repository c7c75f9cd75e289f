"""Generation: greedy equals a no-cache argmax loop, left padding, EOS, sampling, no recompiles, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import emollm_jax  # noqa: F401  (flax config first)
from emollm_jax.generate import generate, greedy_token, make_generate_fn, sample_token
from emollm_jax.models.clip import CLIPConfig
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig
from emollm_jax.models.llama import LlamaConfig, LlamaForCausalLM
from emollm_jax.models.projectors import MLPProjectorConfig

V, PAD, N_NEW = 64, 0, 12
TEXT = LlamaConfig(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2
)


@pytest.fixture(scope="module")
def llm():
    return LlamaForCausalLM(TEXT, rngs=nnx.Rngs(0))


def _prompts(lengths, t, seed=0):
    """Left-padded int32[B, T] prompts of the given lengths and their masks."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), t), PAD, np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        ids[b, t - n :] = rng.integers(1, V, size=n)
        mask[b, t - n :] = 1
    return ids, mask


def _argmax_loop(forward, ids, n):
    """Reference: the full forward (no cache) over the growing sequence, one token at a time. The sequence
    sits right-padded in a fixed buffer (causal attention: padding on the right changes no earlier logit),
    so the jitted forward compiles once."""
    t = ids.shape[1]
    buf = np.concatenate([ids, np.zeros((1, n), ids.dtype)], axis=1)
    forward = jax.jit(forward)
    for i in range(n):
        buf[0, t + i] = int(np.argmax(np.asarray(forward(jnp.asarray(buf)))[0, t + i - 1]))
    return buf[0, t:].tolist()


def test_greedy_equals_argmax_loop_without_cache(llm):
    ids, mask = _prompts([7], 7)
    got = generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD)
    graphdef, state = nnx.split(llm)
    want = _argmax_loop(lambda x: nnx.merge(graphdef, state)(x), ids, N_NEW)
    assert np.asarray(got)[0].tolist() == want


def test_left_padded_batch_equals_rows_alone(llm):
    ids, mask = _prompts([3, 8, 5], 8, seed=1)
    batch = np.asarray(generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD))
    for b in range(3):
        real = ids[b : b + 1, mask[b] > 0]
        alone = generate(llm, real, np.ones_like(real), max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD)
        assert batch[b].tolist() == np.asarray(alone)[0].tolist(), b


def test_eos_stops_the_row_and_pads(llm):
    ids, mask = _prompts([6, 6], 6, seed=2)
    free = np.asarray(generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD))
    eos = int(free[0, 3])
    stop = free[0].tolist().index(eos)  # first occurrence (may precede position 3)
    got = np.asarray(generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=[V + 5, eos], pad_id=PAD))
    assert got[0, : stop + 1].tolist() == free[0, : stop + 1].tolist()
    assert (got[0, stop + 1 :] == PAD).all()
    row1 = free[1].tolist()
    stop1 = row1.index(eos) if eos in row1 else N_NEW - 1
    assert got[1, : stop1 + 1].tolist() == row1[: stop1 + 1]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(llm):
    ids, mask = _prompts([5, 4], 5, seed=3)
    kw = dict(max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD, temperature=5.0)
    a = np.asarray(generate(llm, ids, mask, seed=7, **kw))
    b = np.asarray(generate(llm, ids, mask, seed=7, **kw))
    c = np.asarray(generate(llm, ids, mask, seed=8, **kw))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = np.asarray(generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD))
    nucleus = np.asarray(generate(llm, ids, mask, seed=7, top_p=1e-6, **kw))
    np.testing.assert_array_equal(nucleus, greedy)


def test_greedy_token_is_argmax_with_first_index_on_ties():
    logits = np.random.default_rng(0).normal(size=(6, 1000)).astype(np.float32)
    logits[1, [3, 700]] = 50.0  # a tie: the first index wins, as with argmax
    logits[2] = -np.inf
    logits[2, 999] = 0.0
    logits[3] = 7.0  # all equal
    np.testing.assert_array_equal(greedy_token(jnp.asarray(logits)), np.argmax(logits, axis=-1))
    assert greedy_token(jnp.asarray(logits))[1] == 3


def test_top_p_keeps_the_nucleus_only():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = np.asarray(jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7))(keys))[:, 0]
    assert set(draws.tolist()) == {0, 1}  # 0.5 < 0.7 so token 1 is needed; 0.8 >= 0.7 so token 2 is not
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.05


def test_repeated_calls_do_not_recompile(llm):
    ids, mask = _prompts([4, 4], 4, seed=4)
    kw = dict(max_new_tokens=5, eos_id=3, pad_id=PAD)
    generate(llm, ids, mask, **kw)
    generate(llm, ids + 1, mask, **kw)
    fn = make_generate_fn(
        nnx.graphdef(llm), max_new_tokens=5, eos_ids=(3,), pad_id=PAD, temperature=0.0, top_p=1.0
    )
    assert fn._cache_size() == 1


def test_emollm_with_image_equals_no_cache_loop():
    vision = CLIPConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
    )
    cfg = EmoLLMConfig(vision=vision, projector=MLPProjectorConfig(), text=TEXT, image_token_id=V - 1)
    model = EmoLLM(cfg, rngs=nnx.Rngs(1))
    ids, mask = _prompts([9, 7], 9, seed=5)
    ids[0, 2:6] = V - 1
    ids[1, 4:8] = V - 1
    pv = jax.random.normal(jax.random.key(0), (2, 1, 16, 16, 3))
    got = np.asarray(generate(model, ids, mask, pixel_values=pv, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD))
    with pytest.raises(ValueError, match="sample 1: 3 image tokens"):
        bad = ids.copy()
        bad[1, 4] = 7
        generate(model, bad, mask, pixel_values=pv, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD)
    graphdef, state = nnx.split(model)
    for b in range(2):
        real = ids[b : b + 1, mask[b] > 0]
        prompt = model.embed_inputs(jnp.asarray(real), pv[b : b + 1])

        def forward(seq, prompt=prompt, n=real.shape[1]):  # generated ids are embedded as text
            m = nnx.merge(graphdef, state)
            return m.llm(inputs_embeds=jnp.concatenate([prompt, m.llm.embed(seq[:, n:])], axis=1))

        assert got[b].tolist() == _argmax_loop(forward, real, N_NEW), b


def test_sharded_state_gives_the_same_tokens(llm):
    ids, mask = _prompts([6, 3, 6, 5], 6, seed=6)
    want = np.asarray(generate(llm, ids, mask, max_new_tokens=N_NEW, eos_id=-1, pad_id=PAD))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    graphdef, state = nnx.split(llm)

    def place(x):
        spec = P(None, "model") if x.ndim == 2 and x.shape[1] % 2 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = nnx.merge(graphdef, jax.tree.map(place, state))
    batch = NamedSharding(mesh, P("data", None))
    got = generate(
        sharded,
        jax.device_put(ids, batch),
        jax.device_put(mask, batch),
        max_new_tokens=N_NEW,
        eos_id=-1,
        pad_id=PAD,
    )
    np.testing.assert_array_equal(np.asarray(got), want)
