"""The Grain pipeline: batch layout, masks, sharding, mixtures, resume, error budget, workers, eval."""

import dataclasses
import json
import re

import numpy as np
import pytest
from test_sources import write_emobench

from data_pipeline import convert_arrayrecord, pipeline, text
from data_pipeline.records import ErrorBudget, ErrorBudgetExceeded

K, S, VT = 4, 32, 3  # frame slots, image size, visual tokens per frame


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    records = write_emobench(root, n_images=14, n_frame_videos=3, n_mp4=1, n_text=2, size=S, frames=K)
    texts = [m["value"] for r in records for m in r["conversations"]] + [text.VICUNA_SYSTEM]
    tok = text.train_tiny_tokenizer(texts, root / "tok")
    return root, records, tok


def _spec(root, **kw):
    base = dict(sources=(str(root / "train.jsonl"),), tokenizer=str(root / "tok"), image_size=S, num_frames=K,
                max_media_frames=K, visual_tokens_per_frame=VT, batch_size=4, seq_buckets=(96, 128, 192),
                seed=3, read_threads=1)
    base.update(kw)
    return pipeline.PipelineSpec(**base)


def _item(tok, ids) -> int:
    """Record index from the 'item N:' the fixture writes into every question."""
    return int(re.search(r"item (\d+)", tok.decode(ids)).group(1))


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout_and_mask_alignment(bench):
    root, records, tok = bench
    spec = _spec(root, num_epochs=1, batch_size=3)
    batches = list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))
    assert len(batches) == len(records) // 3
    for batch in batches:
        b, t = batch["input_ids"].shape
        assert b == 3 and t in spec.seq_buckets
        assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
            "input_ids": (np.int32, (3, t)), "attention_mask": (np.int32, (3, t)),
            "targets": (np.int32, (3, t)), "loss_mask": (np.float32, (3, t)),
            "pixel_values": (np.float32, (3, K, S, S, 3)), "frame_media": (np.int32, (3, K))}
        for row in range(b):
            ids, attn = batch["input_ids"][row], batch["attention_mask"][row]
            n = attn.sum()
            assert attn[:n].all() and not attn[n:].any() and (ids[n:] == tok.pad_id).all()
            np.testing.assert_array_equal(batch["targets"][row, : n - 1], ids[1:n])
            rec = records[_item(tok, ids[:n])]
            sup = batch["targets"][row][batch["loss_mask"][row] > 0]
            assert tok.decode(sup) == tok.decode(tok.encode(rec["conversations"][1]["value"]) + [tok.eos_id])
            # image tokens are never targets of the loss; their number matches the media's frames
            assert not (sup == tok.image_token_id).any()
            fm = batch["frame_media"][row]
            n_frames = int((fm >= 0).sum())
            assert (ids == tok.image_token_id).sum() == VT * n_frames
            assert n_frames == (1 if "image" in rec else K if "video" in rec else 0)
            assert (fm[:n_frames] == 0).all() and (fm[n_frames:] == -1).all()
            assert not batch["pixel_values"][row, n_frames:].any()
            if n_frames:
                assert np.abs(batch["pixel_values"][row, :n_frames]).sum() > 0


def test_process_shards_are_disjoint_and_cover_the_epoch(bench):
    root, records, tok = bench
    spec = _spec(root, num_epochs=1, batch_size=1)
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=p, process_count=2)
        seen.append([_item(tok, b["input_ids"][0]) for b in it])
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(len(records)))
    # shuffled, and differently in the second epoch
    two = pipeline.make_train_iterator(dataclasses.replace(spec, num_epochs=2), tokenizer=tok,
                                       process_index=0, process_count=1)
    order = [_item(tok, b["input_ids"][0]) for b in two]
    n = len(records)
    assert sorted(order[:n]) == sorted(order[n:]) == list(range(n))
    assert order[:n] != list(range(n)) and order[:n] != order[n:]


def test_mixture_weights_and_determinism(bench, tmp_path):
    root, records, tok = bench
    with open(tmp_path / "text.jsonl", "w") as f:
        for i in range(5):
            conv = [{"from": "human", "value": "is a smile a sign of joy?"}, {"from": "gpt", "value": "yes"}]
            f.write(json.dumps({"id": f"vqa-t{i}", "task": "vqa", "conversations": conv}) + "\n")
    spec = _spec(root, sources=(str(root / "train.jsonl"), str(tmp_path / "text.jsonl")), weights=(0.8, 0.2),
                 data_root=str(root), batch_size=8)
    a = _take(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1), 25)
    frac_text = np.mean([(b["frame_media"] < 0).all(axis=1) for b in a])
    n_text_in_bench = sum("image" not in r and "video" not in r for r in records) / len(records)
    expected = 0.2 + 0.8 * n_text_in_bench
    assert abs(frac_text - expected) < 0.06, (frac_text, expected)
    b = _take(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1), 25)
    _assert_batches_equal(a, b)


def test_resume_is_exact_through_json(bench):
    root, _, tok = bench
    spec = _spec(root)
    it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 6)  # crosses an epoch boundary (20 records, batch 4)
    resumed = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 6), expected)


def test_zero_supervised_batch_names_records(bench):
    class Unsupervised(text.ChatTemplate):
        def render(self, system, turns, for_generation):
            return [text.Piece(f"{q} {a}") for q, a in turns]

    root, _, tok = bench
    spec = _spec(root, template=Unsupervised("broken", "sys"), shuffle=False)
    with pytest.raises(ValueError, match=r"zero supervised tokens \(records: emo_c-0000, emo_c-0001, "):
        next(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))


def _with_bad_lines(root, tmp_path):
    lines = (root / "train.jsonl").read_text().splitlines()
    lines.insert(2, "{broken")
    bad = json.loads(lines[5])
    bad["task"] = "poetry"
    lines[5] = json.dumps(bad)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


@pytest.mark.parametrize("validate", ["lazy", "upfront"])
def test_error_budget_skips_counts_and_stops(bench, tmp_path, validate):
    root, records, tok = bench
    path, n_lines = _with_bad_lines(root, tmp_path)
    spec = _spec(root, sources=(str(path),), data_root=str(root), num_epochs=1, batch_size=1, max_errors=2,
                 validate=validate)
    budget = ErrorBudget(spec.max_errors)
    out = list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1,
                                            budget=budget))
    assert len(out) == n_lines - 2
    assert budget.skipped == 2 and set(budget.by_field) == {"json", "task"}
    assert f"{path}:3: json" in budget.summary()
    spec = dataclasses.replace(spec, max_errors=1)
    with pytest.raises(ErrorBudgetExceeded, match="2 invalid records skipped"):
        list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))


def test_records_over_limits_are_skipped(bench):
    root, records, tok = bench
    spec = _spec(root, num_epochs=1, batch_size=1, max_media_frames=2, max_errors=len(records))
    budget = ErrorBudget(len(records))
    out = list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1,
                                            budget=budget))
    n_videos = sum("video" in r for r in records)
    assert len(out) == len(records) - n_videos and budget.skipped == n_videos
    assert "frames > max_media_frames 2" in budget.summary()


def test_arrayrecord_source_gives_the_same_batches(bench, tmp_path):
    root, _, tok = bench
    convert_arrayrecord.convert([root / "train.jsonl"], tmp_path / "emo", data_root=root, num_shards=2)
    ref = _take(pipeline.make_train_iterator(_spec(root), tokenizer=tok, process_index=0, process_count=1), 4)
    spec = _spec(root, sources=(str(tmp_path / "emo"),))
    _assert_batches_equal(_take(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0,
                                                             process_count=1), 4), ref)


def test_workers_give_the_same_batches(bench):
    root, _, tok = bench
    spec = _spec(root)
    ref = _take(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1), 6)
    workers = dataclasses.replace(spec, worker_count=2)
    it = pipeline.make_train_iterator(workers, tokenizer=tok, process_index=0, process_count=1)
    got = _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    got += _take(it, 3)
    _assert_batches_equal(got, ref)
    it2 = pipeline.make_train_iterator(workers, tokenizer=tok, process_index=0, process_count=1)
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 3), ref[3:])


def test_eval_batches_left_padded_in_order_with_metadata(bench):
    root, records, tok = bench
    spec = _spec(root, batch_size=6)
    batches = list(pipeline.make_eval_batches(spec, tokenizer=tok))
    metas = [m for _, ms in batches for m in ms]
    assert [m["id"] for m in metas] == [r["id"] for r in records]
    assert [m["label"] for m in metas] == [r.get("label") for r in records]
    assert metas[0]["options"] == records[0]["options"] and "Item 0" in metas[0]["prompt"]
    assert len(batches) == -(-len(records) // 6)
    for batch, ms in batches:
        b, t = batch["input_ids"].shape
        assert b == 6 and t in spec.seq_buckets and batch["pixel_values"].shape == (6, K, S, S, 3)
        np.testing.assert_array_equal(batch["valid"], np.arange(6) < len(ms))
        for row, meta in enumerate(ms):
            ids, attn = batch["input_ids"][row], batch["attention_mask"][row]
            n = attn.sum()
            assert not attn[: t - n].any() and attn[t - n:].all()
            assert tok.decode(ids[t - n:]).endswith("assistant :")
            assert records[_item(tok, ids[t - n:])]["id"] == meta["id"]
        assert not batch["attention_mask"][len(ms):].any() and (batch["frame_media"][len(ms):] == -1).all()


def test_visual_tokens_pooling_and_callable():
    spec = pipeline.PipelineSpec(sources=("x.jsonl",), tokenizer="t", visual_tokens_per_frame=16)
    assert (spec.visual_tokens(1), spec.visual_tokens(4)) == (16, 64)
    spec = dataclasses.replace(spec, video_pooling="mean")
    assert spec.visual_tokens(4) == 16
    spec = dataclasses.replace(spec, visual_tokens_fn=lambda f: 5 * f + 1)
    assert spec.visual_tokens(4) == 21
    with pytest.raises(ValueError, match="strictly increasing"):
        dataclasses.replace(spec, seq_buckets=(256, 128))


def test_spec_carries_the_image_normalisation(bench):
    """The spec's mean and std reach `media.load_media`; the defaults are CLIP's."""
    from data_pipeline import media

    root, records, tok = bench
    default = _spec(root, num_epochs=1, shuffle=False, batch_size=1)
    assert (default.image_mean, default.image_std) == (media.CLIP_MEAN, media.CLIP_STD)
    half = dataclasses.replace(default, image_mean=[0.5, 0.5, 0.5], image_std=(0.5, 0.5, 0.5))
    assert half.image_mean == (0.5, 0.5, 0.5) and hash(half)
    batch = next(pipeline.make_train_iterator(half, tokenizer=tok, process_index=0, process_count=1))
    assert int((batch["frame_media"][0] >= 0).sum()) == 1 and "image" in records[0]
    want = media.load_media(records[0], root, image_size=S, num_frames=K, mean=(0.5,) * 3, std=(0.5,) * 3)
    np.testing.assert_array_equal(batch["pixel_values"][0, :1], want)
    with pytest.raises(ValueError, match="3 values"):
        dataclasses.replace(default, image_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        dataclasses.replace(default, image_std=(0.5, 0.0, 0.5))


# ---------------------------------------------------------------------------------- tasks, weights, state


def test_a_task_filter_reads_like_a_file_of_those_records(bench, tmp_path):
    """Filtering by task inside the pipeline gives the batches a file holding only those records gave (same
    seed): the user's file is read in place, and a stage reads what it read before."""
    root, records, tok = bench
    keep = ("emo_c", "vqa")
    only = tmp_path / "only.jsonl"
    only.write_text("".join(json.dumps(r) + "\n" for r in records if r["task"] in keep))
    filtered = _spec(root, data_root=str(root), tasks=keep, batch_size=3)
    ref = _spec(root, sources=(str(only),), data_root=str(root), batch_size=3)
    got = pipeline.make_train_iterator(filtered, tokenizer=tok, process_index=0, process_count=1)
    want = pipeline.make_train_iterator(ref, tokenizer=tok, process_index=0, process_count=1)
    assert got.num_records == want.num_records == sum(r["task"] in keep for r in records)
    _assert_batches_equal(_take(got, 8), _take(want, 8))


def test_task_weights_give_each_task_its_share(bench):
    root, records, tok = bench
    spec = _spec(root, data_root=str(root), tasks=("emo_c", "vqa"), task_weights=(1.0, 3.0), batch_size=8)
    it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    assert it.task_shares == {"emo_c": 0.25, "vqa": 0.75}
    text_rows = np.mean([(b["frame_media"] < 0).all(axis=1) for b in _take(it, 25)])  # vqa rows are text
    assert abs(text_rows - 0.75) < 0.06, text_rows
    with pytest.raises(ValueError, match=r"task weights name \['hate'\]"):
        pipeline.make_train_iterator(_spec(root, data_root=str(root), tasks=("emo_c", "hate"),
                                           task_weights=(1.0, 1.0)), tokenizer=tok)


def test_a_source_task_fills_records_without_one(bench, tmp_path):
    from data_pipeline.sources import SourceSpec

    root, records, tok = bench
    plain = [{k: v for k, v in r.items() if k != "task"} for r in records if r["task"] == "vqa"]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(plain))
    spec = _spec(root, sources=(SourceSpec(str(path), task="vqa", root=str(root)),), tasks=("vqa",),
                 num_epochs=1, batch_size=1)
    assert len(list(pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1))) \
        == len(plain)
    budget = ErrorBudget(len(plain))
    bare = dataclasses.replace(spec, sources=(str(path),), tasks=None)
    with pytest.raises(ValueError, match="no valid record"):
        pipeline.make_train_iterator(bare, tokenizer=tok, process_index=0, process_count=1, budget=budget)
    assert budget.skipped == len(plain) and budget.examples[0].field == "task"
    assert str(budget.examples[0]) == f"{path}:1: task: missing required field"


def test_duplicate_ids_across_sources_are_charged(bench, tmp_path):
    root, records, tok = bench
    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    spec = _spec(root, sources=(str(root / "train.jsonl"), str(copy)), data_root=str(root), max_errors=1)
    with pytest.raises(ErrorBudgetExceeded, match=rf"{copy}:2: id: duplicate id 'emo_c-0001'; first used at "
                                                  rf"{root / 'train.jsonl'}:2"):
        pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)


def test_the_error_count_is_part_of_the_iterator_state(bench, tmp_path):
    """Lazy validation: skipped records are counted as they are read; a resumed iterator continues from the
    saved count (and position), so the budget spans the whole run."""
    root, records, tok = bench
    path = tmp_path / "bad_label.jsonl"
    bad = dict(records[0], id="emo_c-bad", label="boredom")  # not among its options: a schema error
    path.write_text("".join(json.dumps(r) + "\n" for r in [*records, bad]))
    spec = _spec(root, sources=(str(path),), data_root=str(root), batch_size=2, max_errors=100,
                 validate="lazy")
    it = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    _take(it, 15)  # 30 samples: past the first epoch of 21 records, so the bad one was met
    state = json.loads(json.dumps(it.get_state()))
    assert state["errors"]["skipped"] >= 1 and set(state["errors"]["by_field"]) == {"label"}
    expected = _take(it, 6)
    resumed = pipeline.make_train_iterator(spec, tokenizer=tok, process_index=0, process_count=1)
    resumed.set_state(state)
    assert resumed.budget.skipped == state["errors"]["skipped"]
    _assert_batches_equal(_take(resumed, 6), expected)
