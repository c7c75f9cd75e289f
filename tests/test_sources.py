"""JSON/JSONL/ArrayRecord/TFDS sources: random access, lazy and upfront validation, embedded media."""

import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from data_pipeline import convert_arrayrecord, media, sources
from data_pipeline.records import ErrorBudgetExceeded

EMOTIONS = ["anger", "joy", "sadness", "fear"]


def write_emobench(root, n_images=12, n_frame_videos=3, n_mp4=1, n_text=1, size=64, frames=4, seed=0):
    """A mini-EmoBench-like copy under `root`: train.jsonl + PNG images, frame directories, mp4 files.

    Each image is a flat colour whose red channel encodes the record index, so decoded pixels identify it.
    Returns the records in file order.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(root / "images", exist_ok=True)
    records = []

    def conv(marker, i):
        label = EMOTIONS[i % len(EMOTIONS)]
        q = f"{marker}Item {len(records)}: what emotion is shown? Options: {', '.join(EMOTIONS)}."
        return [{"from": "human", "value": q}, {"from": "gpt", "value": label}], label

    def png(path, value):
        arr = np.full((size, size, 3), value, np.uint8)
        arr[..., 1:] = rng.integers(0, 255, 2, dtype=np.uint8)
        Image.fromarray(arr).save(path)

    for i in range(n_images):
        png(root / f"images/{i}.png", 10 * i % 250)
        c, label = conv("<image>\n", i)
        records.append({"id": f"emo_c-{i:04d}", "task": "emo_c", "image": f"images/{i}.png",
                        "conversations": c, "label": label, "options": EMOTIONS})
    for j in range(n_frame_videos):
        d = root / f"videos/clip{j}"
        os.makedirs(d, exist_ok=True)
        for f in range(frames):
            png(d / f"{f:03d}.png", 20 * f)
        c, label = conv("<video>\n", j)
        video = f"videos/clip{j}" if j % 2 == 0 else [f"videos/clip{j}/{f:03d}.png" for f in range(frames)]
        records.append({"id": f"emo_o-{j:04d}", "task": "emo_o", "video": video, "conversations": c,
                        "label": label})
    for k in range(n_mp4):
        import av

        path = root / f"videos/m{k}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("mpeg4", rate=4)
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for f in range(frames * 2):
                frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), 30 * f, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        c, label = conv("<video>\n", k)
        records.append({"id": f"intent-{k:04d}", "task": "intent", "video": f"videos/m{k}.mp4",
                        "conversations": c, "label": label})
    for t in range(n_text):
        records.append({"id": f"vqa-{t:04d}", "task": "vqa", "conversations": [
            {"from": "human", "value": f"Item {len(records)}: is a smile a sign of joy?"},
            {"from": "gpt", "value": "yes"}]})
    with open(root / "train.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("emobench")
    return root, write_emobench(root)


def test_jsonl_and_json_random_access(bench, tmp_path):
    root, records = bench
    src = sources.JsonRecordSource(root / "train.jsonl", data_root=root)
    assert len(src) == len(records)
    for i in (0, 7, len(records) - 1, 3):
        ex = src[i]
        assert ex["record"] == records[i] and ex["line"] == i + 1 and ex["errors"] == []
    with pytest.raises(IndexError):
        src[len(records)]
    (tmp_path / "list.json").write_text(json.dumps(records[:3]))
    src = sources.JsonRecordSource(tmp_path / "list.json")
    assert [src[i]["record"]["id"] for i in range(3)] == [r["id"] for r in records[:3]]
    assert len(grain.MapDataset.source(src)) == 3


def test_bad_lines_lazy_vs_upfront(bench, tmp_path):
    root, records = bench
    lines = [json.dumps(r) for r in records[:4]]
    lines.insert(1, "{not json")
    lines.insert(3, "")  # blank lines are not records
    bad = dict(records[2], task="poetry")
    lines.append(json.dumps(bad))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")

    src = sources.JsonRecordSource(path, data_root=root)
    assert len(src) == 6
    ex = src[1]
    assert ex["record"] is None and ex["line"] == 2 and ex["errors"][0].field == "json"
    assert str(ex["errors"][0]).startswith(f"{path}:2: json:")
    ex = src[5]
    assert ex["line"] == 7 and [e.field for e in ex["errors"]] == ["task"]
    assert src[2]["line"] == 3 and src[2]["errors"] == []

    up = sources.JsonRecordSource(path, data_root=root, validate="upfront")
    assert up.valid_indices() == [0, 2, 3, 4]
    assert up[5]["errors"] == []  # upfront: the pipeline reads only valid_indices(); no per-item cost
    none = sources.JsonRecordSource(path, validate="none")
    assert none[5]["errors"] == [] and none[1]["errors"]  # unparseable lines are always errors


def test_arrayrecord_roundtrip_embeds_media(bench, tmp_path):
    root, records = bench
    paths, n = convert_arrayrecord.convert([root / "train.jsonl"], tmp_path / "out/emo", data_root=root,
                                           num_shards=3)
    assert n == len(records) and [os.path.basename(p) for p in paths] == [
        f"emo-{k:05d}-of-00003.array_record" for k in range(3)]
    assert not [f for f in os.listdir(tmp_path / "out") if f.startswith(".tmp")]
    src = sources.ArrayRecordSource(tmp_path / "out/emo", data_root=tmp_path / "nowhere")
    assert len(src) == len(records)
    for i, want in enumerate(records):
        ex = src[i]
        assert ex["errors"] == [], ex["errors"]
        rec = ex["record"]
        assert rec["id"] == want["id"] and rec["conversations"] == want["conversations"]
        assert (ex["source"], ex["line"]) == (str(root / "train.jsonl"), i + 1)  # errors point at the input
        assert "image" not in rec and "video" not in rec
        # decoded media equal the ones decoded from the original files
        got = media.load_media(rec, None, image_size=32, num_frames=4)
        ref = media.load_media(want, root, image_size=32, num_frames=4)
        np.testing.assert_array_equal(got, ref)
    kinds = {k for r in (src[i]["record"] for i in range(len(src)))
             for k in ("image_bytes", "video_frames_bytes", "video_bytes") if k in r}
    assert kinds == {"image_bytes", "video_frames_bytes", "video_bytes"}


def test_convert_cli_error_budget_and_atomicity(bench, tmp_path, capsys):
    root, records = bench
    bad = tmp_path / "bad.jsonl"
    missing = dict(records[0], id="emo_c-missing", image="images/missing.png")
    rows = [json.dumps(r) for r in records[:4]] + [json.dumps(missing)]
    bad.write_text("\n".join(rows) + "\n")
    args = [str(bad), "--data-root", str(root), "--out", str(tmp_path / "x/emo")]
    assert convert_arrayrecord.main(args) == 1
    assert f"{bad}:5: media:" in capsys.readouterr().err
    with pytest.raises(ErrorBudgetExceeded, match="media"):
        convert_arrayrecord.convert([bad], tmp_path / "x/emo", data_root=root)
    assert not os.path.exists(tmp_path / "x") or not os.listdir(tmp_path / "x")
    assert convert_arrayrecord.main([str(bad), "--data-root", str(root), "--out", str(tmp_path / "y/emo"),
                                     "--num-shards", "2", "--max-errors", "1"]) == 0
    assert len(sources.ArrayRecordSource(tmp_path / "y/emo")) == 4


def test_arrayrecord_index_files_name_task_id_and_origin(bench, tmp_path):
    """A pipeline filters shards by task from their index files, which say what decoding every record says."""
    root, records = bench
    paths, _ = convert_arrayrecord.convert([root / "train.jsonl"], tmp_path / "emo", data_root=root,
                                           num_shards=2)
    stored = sources.ArrayRecordSource(tmp_path / "emo").index()
    assert [(e.task, e.id, e.source, e.line) for e in stored] == [
        (r["task"], r["id"], str(root / "train.jsonl"), i + 1) for i, r in enumerate(records)]
    for path in paths:
        os.unlink(path + sources.INDEX_SUFFIX)
    assert sources.ArrayRecordSource(tmp_path / "emo").index() == stored


def test_tfds_builder_without_tensorflow(bench, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from data_pipeline import tfds_emobench

    root, records = bench
    builder = tfds_emobench.EmoBench(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(root)), file_format="array_record")
    src = sources.open_source("tfds:emo_bench/train", data_dir=tmp_path / "tfds")
    assert len(src) == len(records)
    by_id = {r["id"]: r for r in records}
    seen = set()
    for i in range(len(src)):
        ex = src[i]
        assert ex["errors"] == [], ex["errors"]
        rec = ex["record"]
        want = by_id[rec["id"]]
        seen.add(rec["id"])
        assert rec["conversations"] == want["conversations"] and rec.get("label") == want.get("label")
        assert rec.get("options") == want.get("options")
        np.testing.assert_array_equal(media.load_media(rec, None, image_size=16, num_frames=4),
                                      media.load_media(want, root, image_size=16, num_frames=4))
    assert seen == set(by_id)
    first = next(iter(grain.MapDataset.source(src).map(lambda e: e["record"]["id"]).to_iter_dataset()))
    assert first in by_id
    # the builder's prepared directory is a source too (what config.data.sources names)
    by_dir = sources.open_source(builder.data_dir, split="train")
    assert len(by_dir) == len(records) and by_dir[0]["record"]["id"] == src[0]["record"]["id"]
    import sys

    assert "tensorflow" not in sys.modules


def test_jsonl_reads_are_thread_safe(bench):
    """Grain reads a source from several threads; random reads must not share a file position."""
    from concurrent.futures import ThreadPoolExecutor

    root, records = bench
    src = sources.JsonRecordSource(root / "train.jsonl", validate="none")
    order = [i % len(records) for i in range(400)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: src[i], order))
    assert all(ex["errors"] == [] and ex["record"] == records[i] for ex, i in zip(got, order, strict=True))
