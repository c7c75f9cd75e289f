"""Sequence packing for training: the packed batch layout, the pipeline's packed stream (every record once per
epoch, exact resume), and the loss of a packed batch equal to the loss of the same records unpacked (fp32,
1e-5) for plain and blockwise attention, with images, videos and voices."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipeline import packing, pipeline
from data_pipeline.sources import SourceSpec
from emollm_jax import data, experiment, plan, sharding, train
from emollm_jax.configuration import load_config
from emollm_jax.models import attention

TINY = f"{Path(__file__).resolve().parents[1] / 'configs' / 'emobench.py'}:tiny"


def _sample(rid, n, answer, frames=0, media=1, windows=0, size=4, mels=2, mel_frames=3):
    """An encoded record: ids 100 + k, the last `answer` tokens supervised; `frames` frames over `media`
    media items (pixel value = the record's number), `windows` sound windows of one sound."""
    ids = np.arange(100, 100 + n, dtype=np.int32) + 1000 * rid
    mask = np.zeros(n, bool)
    mask[n - answer:] = True
    out = {"id": f"r{rid}", "input_ids": ids, "loss_mask": mask,
           "pixel_values": np.full((frames, size, size, 3), rid, np.float32),
           "frame_media": np.sort(np.arange(frames) % media).astype(np.int32)}
    if windows:
        out["audio_features"] = np.full((windows, mels, mel_frames), rid, np.float32)
        out["audio_media"] = np.zeros(windows, np.int32)
    return out


def test_pack_rows_layout():
    layout = packing.RowLayout(length=12, frame_slots=5, image_size=4, audio_slots=3, audio_mels=2,
                               audio_frames=3)
    a = _sample(1, 5, 2, frames=2, media=2)
    b = _sample(2, 4, 1, frames=3, media=1, windows=2)
    c = _sample(3, 6, 3, windows=1)
    out = packing.pack_rows([[a, b], [c]], layout, pad_id=0)
    np.testing.assert_array_equal(out["segment_ids"], [[1] * 5 + [2] * 4 + [0] * 3, [1] * 6 + [0] * 6])
    np.testing.assert_array_equal(out["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
    np.testing.assert_array_equal(out["attention_mask"], out["segment_ids"] > 0)
    # each record predicts its own next tokens only: nothing crosses into the next record
    np.testing.assert_array_equal(out["targets"][0, :9], [*a["input_ids"][1:], 0, *b["input_ids"][1:], 0])
    # position t is scored on token t + 1: a record's answer tokens, never the next record's first
    np.testing.assert_array_equal(out["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["loss_mask"][1], [0, 0, 1, 1, 1] + [0] * 7)
    # frames in record order, media numbered across the row's records; empty slots -1 and zero
    np.testing.assert_array_equal(out["frame_media"], [[0, 1, 2, 2, 2], [-1] * 5])
    np.testing.assert_array_equal(out["pixel_values"][0, :, 0, 0, 0], [1, 1, 2, 2, 2])
    assert not out["pixel_values"][1].any()
    np.testing.assert_array_equal(out["audio_media"], [[0, 0, -1], [0, -1, -1]])
    np.testing.assert_array_equal(out["audio_features"][:, :, 0, 0], [[2, 2, 0], [3, 0, 0]])
    unsupervised = dict(a, loss_mask=np.zeros(5, bool))
    with pytest.raises(ValueError, match=r"zero supervised tokens \(records: r1\)"):
        packing.pack_rows([[unsupervised]], layout, pad_id=0)


def test_first_fit_slots_and_records_per_row():
    used = [[4, 1], [0, 0]]
    assert packing.first_fit(used, (4, 1), (8, 1)) == 1 and used == [[4, 1], [4, 1]]  # row 0: no frame slot
    assert packing.first_fit(used, (5, 0), (8, 1)) is None
    # 16 tokens per frame: a 160-token row holds at most 10 frames; video frames averaged into 16 tokens: 40
    assert packing.slots_per_row(160, lambda n: 16 * n, 4, 4) == 10
    assert packing.slots_per_row(160, lambda n: 16, 4, 4) == 40
    assert packing.slots_per_row(20, lambda n: 16 * n, 4, 4) == 4  # at least one record's
    assert packing.mean_records_per_row([3, 3, 3, 3, 3, 3], rows=2, length=6) == 2.0
    assert packing.mean_records_per_row([4, 4, 4, 1], rows=2, length=6) == 1.0  # the 3rd closed batch 1
    assert packing.mean_records_per_row([4, 2, 1], rows=2, length=6) == 1.5  # one batch, cut short: 2 rows


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny variant (with its audio tower) on a small mini-EmoBench with voices: config, data setup,
    tokenizer, model config."""
    workdir = tmp_path_factory.mktemp("packing")
    c = load_config(TINY)
    c.data.update(mini_train_per_task=6, mini_test_per_task=1)
    c.model.text.update(hidden_size=64, intermediate_size=128, num_layers=2)
    setup = experiment.prepare_data(c, workdir)
    tok = experiment.load_tokenizer(setup)
    cfg = experiment.model_config(c, vocab_size=tok.vocab_size, image_token_id=tok.image_token_id,
                                  audio_token_id=getattr(tok, "audio_token_id", None))
    return c, setup, tok, cfg


def _spec(tiny, packing_on, batch_size, **kw):
    c, setup, _, cfg = tiny
    c = c.copy_and_resolve_references()
    c.data.packing = packing_on
    sources, _ = data.split_sources(c, "train", setup.root)
    spec = data.pipeline_spec(c, cfg, sources=sources, tokenizer=setup.tokenizer_path, data_root=setup.root,
                              batch_size=batch_size, training=True, tasks=("emo_c", "emo_o", "sarcasm"))
    return dataclasses.replace(spec, **kw)


def _ids_of(batch):
    """The records of a packed batch, as their token sequences (one per segment)."""
    out = []
    for row, seg in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        out += [tuple(row[seg == s]) for s in range(1, seg.max() + 1)]
    return out


def test_packed_stream_reads_every_record_once_per_epoch(tiny):
    _, _, tok, _ = tiny
    spec = _spec(tiny, True, 3, num_epochs=1)
    batches = list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))
    one = dataclasses.replace(spec, packing=False, batch_size=1)
    plain = pipeline.make_train_iterator(one, tokenizer=tok, process_index=0, process_count=1)
    records = sorted(tuple(b["input_ids"][0, :b["attention_mask"][0].sum()]) for b in plain)
    assert sorted(r for b in batches for r in _ids_of(b)) == records
    assert len(records) == 3 * 6 + 2 * 6  # emo_c and sarcasm have voice records too
    per_row = np.mean([b["segment_ids"].max(1).mean() for b in batches])
    assert per_row > 1.5, per_row  # rows really hold several records
    layout = packing.row_layout(spec)
    assert spec.seq_buckets == (160,) and batches[0]["input_ids"].shape == (3, 160)
    assert batches[0]["pixel_values"].shape[1] == layout.frame_slots == 160 // 16
    assert batches[0]["audio_media"].shape[1] == layout.audio_slots == 160 // 10


def test_packed_stream_resumes_exactly_through_json(tiny):
    _, _, tok, _ = tiny
    for workers in (0, 2):
        spec = _spec(tiny, True, 2, worker_count=workers)
        it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
        for _ in range(5):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(8)]  # past the end of the first epoch
        resumed = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
        resumed.set_state(state)
        for want in expected:
            got = next(resumed)
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # a state from the other kind of stream is refused, naming the key that changed
    unpacked = pipeline.make_train_iterator(dataclasses.replace(spec, packing=False), tokenizer=tok,
                                            process_index=0, process_count=1)
    with pytest.raises(ValueError, match="config.data.packing changed"):
        unpacked.set_state(state)
    with pytest.raises(ValueError, match="config.data.packing changed"):
        resumed.set_state(json.loads(json.dumps(unpacked.get_state())))


def test_packed_stream_counts_skipped_records_at_its_resume_point(tiny, tmp_path):
    """A record skipped (lazy validation) between the last packed record and the one carried over is counted
    once: the saved count is the count at the saved stream position."""
    c, setup, tok, _ = tiny
    lines = (Path(setup.root) / "train.jsonl").read_text().splitlines()
    for i in range(0, len(lines), 4):
        bad = json.loads(lines[i])
        bad["label"] = "boredom-not-an-option"
        lines[i] = json.dumps(bad)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    spec = _spec(tiny, True, 2, validate="lazy", max_errors=10_000, data_root=setup.root,
                 sources=(SourceSpec(str(path)),))
    it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    resumed = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert resumed.budget.skipped == state["errors"]["skipped"] > 0
    got = [next(resumed) for _ in range(4)]
    assert resumed.budget.skipped == it.budget.skipped  # the replayed skips reach the same count
    for g, w in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g["input_ids"], w["input_ids"])


def test_the_plan_compiles_the_packed_batch(tiny):
    c, _, _, cfg = tiny
    c = c.copy_and_resolve_references()
    c.data.packing = True
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    batch = plan.abstract_batch(c, 8, mesh, cfg)
    assert batch["segment_ids"].shape == batch["positions"].shape == (8, 160)
    assert batch["pixel_values"].shape[:2] == batch["frame_media"].shape == (8, 10)
    assert batch["audio_media"].shape == (8, 16)
    assert set(batch) == set(train.BATCH_KEYS)


# ----------------------------------------------------------------------------------------- packed = unpacked


def _loss_fn(model_cfg):
    """batch -> the model's training loss, jitted (fresh weights from seed 0)."""
    graphdef, state = nnx.split(experiment.new_model(model_cfg, 0))
    fn = jax.jit(lambda st, b: train.model_loss(nnx.merge(graphdef, st), b)[0])
    return lambda batch: float(fn(state, batch))


@pytest.mark.parametrize("implementation", ["plain", "blockwise"])
def test_packed_loss_equals_the_unpacked_loss(tiny, implementation, monkeypatch):
    """The first packed batch of a stream holds its first M records (the M+1-th closed it); the
    unpacked batch of M rows holds the same records: same loss."""
    _, _, tok, cfg = tiny
    monkeypatch.setattr(attention, "BLOCK_Q", 32)  # several blocks per row: skipped and partial ones
    monkeypatch.setattr(attention, "BLOCK_K", 32)
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, attention=implementation))
    spec = _spec(tiny, True, 4, num_epochs=1)
    packed = next(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))
    m = int(packed["segment_ids"].max(1).sum())
    assert (packed["frame_media"] >= 0).any() and (packed["audio_media"] >= 0).any()
    plain = dataclasses.replace(spec, packing=False, batch_size=m, seq_buckets=(160,))
    unpacked = next(pipeline.make_train_iterator(plain, tokenizer=tok, process_index=0, process_count=1))
    assert sorted(_ids_of(packed)) == sorted(
        tuple(r[:n]) for r, n in zip(unpacked["input_ids"], unpacked["attention_mask"].sum(1), strict=True))
    assert packed["loss_mask"].sum() == unpacked["loss_mask"].sum()
    calls = []
    orig = attention.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    loss = _loss_fn(cfg)
    reference = loss(unpacked)
    assert abs(loss(packed) - reference) < 1e-5, (loss(packed), reference)
    assert bool(calls) == (implementation == "blockwise")  # the decoder ran the implementation asked for
    # without segment ids the records of a row would see each other: the loss differs
    mixed = {k: v for k, v in packed.items() if k not in ("segment_ids", "positions")}
    assert abs(loss(mixed) - reference) > 1e-3
