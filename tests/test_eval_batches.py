"""How evaluation shapes its generation batches for speed: media slots no row uses are cut before the towers
run (the answers stay the same), and prompts pad to buckets less than an eighth (or 64 tokens) longer than
they are."""

import numpy as np
import pytest

from data_pipeline.pipeline import bucket_length
from emollm_jax import data, evaluate
from emollm_jax.generate import generate


def test_trim_media_keeps_the_slots_some_row_uses_by_hand():
    def batch(slots):
        slots = np.asarray(slots, np.int32)
        return {"input_ids": np.zeros((len(slots), 3), np.int32), "frame_media": slots,
                "pixel_values": np.arange(slots.size, dtype=np.float32).reshape(*slots.shape, 1, 1, 1)}

    two = evaluate.trim_media(batch([[0, -1, -1, -1], [0, 1, -1, -1]]))  # an image, two images
    assert two["frame_media"].tolist() == [[0, -1], [0, 1]]
    assert two["pixel_values"][:, :, 0, 0, 0].tolist() == [[0, 1], [4, 5]]
    assert evaluate.trim_media(batch([[0, 0, 0, -1]]))["frame_media"].shape == (1, 4)  # 3 frames: 4 slots
    assert evaluate.trim_media(batch([[-1, -1, -1, -1]]))["frame_media"].shape == (1, 1)  # text only
    assert evaluate.trim_media(batch([[0, -1, -1, -1]]), {"frame_media": 2})["frame_media"].shape == (1, 2)
    sound = {"audio_media": np.array([[0, 0, 0, -1, -1, -1, -1, -1]]),  # one sound of 3 windows
             "audio_features": np.zeros((1, 8, 2, 3))}
    assert evaluate.trim_media(sound)["audio_features"].shape == (1, 4, 2, 3)
    assert evaluate.trim_media(sound, {"frame_media": 1})["audio_features"].shape == (1, 8, 2, 3)


def test_eval_buckets_pad_a_prompt_by_less_than_an_eighth_or_64_tokens():
    class Text:
        max_position_embeddings = 2048

    class Model:
        text = Text

    buckets = data.eval_buckets(Model, 8)
    assert list(buckets) == sorted(set(buckets)) and buckets[-1] <= 2048 - 8
    assert buckets[:2] == (64, 128)  # short prompts keep the shapes they had
    for length in range(65, buckets[-1] + 1):
        assert bucket_length(length, buckets) - length < max(64, length / 8)
    assert bucket_length(576 + 60, buckets) == 640  # an image and its question: not 1024
    assert buckets[-1] > 1024  # a prompt up to the context fits, not only up to a power of two


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tiny_eval_setup import make_data, random_model, tiny_config

    data_root, tok_path, tok = make_data(tmp_path_factory.mktemp("eval_batches"), per_task_test=2)
    config = tiny_config(data_root, tok_path)
    config.eval.batch_size = 4  # more batches, some of images only
    return config, tok, random_model(config, tok), data_root


def test_cutting_unused_media_slots_leaves_the_answers_as_they_were(tiny):
    config, tok, model, root = tiny
    batches, _ = evaluate.record_batches(config, root / "test.jsonl", root, tok, model)
    stops = evaluate.stop_ids(config, tok)
    cut = 0
    for batch, _ in batches:
        trimmed = evaluate.trim_media(batch)
        cut += trimmed["frame_media"].shape[1] < batch["frame_media"].shape[1]
        full, short = (np.asarray(generate(model, b["input_ids"], b["attention_mask"],
                                           pixel_values=b["pixel_values"], frame_media=b["frame_media"],
                                           max_new_tokens=4, eos_id=stops, pad_id=tok.pad_id))
                       for b in (batch, trimmed))
        np.testing.assert_array_equal(short, full)
    assert cut  # image batches ran their tower on one frame slot instead of data.num_frames


def test_batches_aligned_for_a_mesh_keep_their_sound():
    """On a mesh of several devices evaluation sends each batch through `_aligned`: the sound and its slot
    map reach the model there too, and a process's padding round carries empty sound slots."""
    import numpy as np

    from emollm_jax import evaluate, sharding

    mesh = sharding.make_mesh({"data": -1})
    rows = mesh.size
    batch = {"input_ids": np.ones((rows, 6), np.int32), "attention_mask": np.ones((rows, 6), np.int32),
             "pixel_values": np.zeros((rows, 1, 4, 4, 3), np.float32),
             "frame_media": np.full((rows, 1), -1, np.int32),
             "audio_features": np.arange(rows * 2 * 3, dtype=np.float32).reshape(rows, 1, 2, 3),
             "audio_media": np.zeros((rows, 1), np.int32), "valid": np.ones(rows, bool)}
    (global_batch, metas), = list(evaluate._aligned([(batch, ["m"])], mesh, pad_id=0))
    assert metas == ["m"]
    np.testing.assert_array_equal(np.asarray(global_batch["audio_features"]), batch["audio_features"])
    np.testing.assert_array_equal(np.asarray(global_batch["audio_media"]), batch["audio_media"])
