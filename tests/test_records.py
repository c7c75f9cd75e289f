"""Record schema validation: every error class names the file, line and field; readers; the error budget."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from data_pipeline.records import (
    ALLOWED_FIELDS,
    ErrorBudget,
    ErrorBudgetExceeded,
    RecordError,
    iter_records,
    media_layout,
    validate_record,
)

SRC = "data/train.jsonl"


@pytest.fixture
def root(tmp_path):
    """A data root with a good image, a zero-byte image, a corrupt one, a truncated PNG and 3 video frames."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    good = tmp_path / "images" / "good.png"
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"this is not an image at all" * 10)
    data = good.read_bytes()
    (tmp_path / "images" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "frames").mkdir()
    for t in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * t, np.uint8)).save(tmp_path / "frames" / f"{t:03d}.png")
    return tmp_path


def good_record(**over):
    rec = {
        "id": "emo_c-1",
        "task": "emo_c",
        "image": "images/good.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhich emotion? Options: [joy, anger]."},
            {"from": "gpt", "value": "joy"},
        ],
        "label": "joy",
        "options": ["joy", "anger"],
        "rationale": "The mouth curves up.",
        "meta": {"source": "test"},
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not ...}


def check(rec, root, line=7, **kw):
    kw.setdefault("num_frames", 4)
    return validate_record(rec, source=SRC, line=line, data_root=root, **kw)


def only(errors, field):
    """The single error for `field`, asserting it names the source and line."""
    hits = [e for e in errors if e.field == field]
    assert len(hits) == 1, [str(e) for e in errors]
    assert hits[0].source == SRC and hits[0].line == 7
    assert str(hits[0]).startswith(f"{SRC}:7: {field}: ")
    return hits[0]


def test_good_record_has_no_errors(root):
    assert check(good_record(), root) == []
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "yo"}]
    text_only = good_record(image=..., conversations=conv)
    assert check(text_only, root) == []


def test_error_string_format():
    e = RecordError("a/b.jsonl", 12, "label", "bad label")
    assert str(e) == "a/b.jsonl:12: label: bad label"
    assert pickle.loads(pickle.dumps(e)).line == 12  # crosses Grain worker processes


def test_missing_and_unknown_fields(root):
    errs = check(good_record(conversations=..., caption="extra"), root)
    assert "missing" in only(errs, "conversations").message
    msg = only(errs, "caption").message
    assert "unknown field" in msg and all(f in msg for f in ALLOWED_FIELDS)


def test_unknown_task(root):
    assert "'emotion'" in only(check(good_record(task="emotion"), root), "task").message


@pytest.mark.parametrize(
    "conversations, field, words",
    [
        ([], "conversations", "non-empty"),
        ([{"from": "gpt", "value": "<image>\nQ"}, {"from": "human", "value": "A"}], "conversations[0].from",
         "human"),
        ([{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "  "}], "conversations[1].value",
         "non-empty"),
        ([{"from": "human", "value": "<image>\nQ"}], "conversations", "end with"),
        ([{"from": "human", "text": "<image>\nQ"}, {"from": "gpt", "value": "A"}], "conversations[0]",
         "'value'"),
    ],
)
def test_conversation_structure(root, conversations, field, words):
    assert words in only(check(good_record(conversations=conversations), root), field).message


@pytest.mark.parametrize(
    "human, over",
    [
        ("Which emotion?", {}),  # image but no marker
        ("<image>\n<image>\nWhich emotion?", {}),  # two markers, one image
        ("<video>\nWhich emotion?", {}),  # wrong marker kind
        ("<image>\nWhich emotion?", {"image": ...}),  # marker without media
    ],
)
def test_marker_count_must_match_media(root, human, over):
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": "joy"}]
    assert "markers" in only(check(good_record(conversations=conv, **over), root), "conversations").message


def test_marker_in_answer_is_an_error(root):
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "joy <image>"}]
    only(check(good_record(conversations=conv), root), "conversations[1].value")


@pytest.mark.parametrize(
    "name, words",
    [("missing.png", "not found"), ("empty.png", "0 bytes"), ("corrupt.png", "unreadable"),
     ("truncated.png", "unreadable")],
)
def test_bad_image_files(root, name, words):
    err = only(check(good_record(image=f"images/{name}"), root), "image")
    assert name in err.message and words in err.message


def test_check_media_false_skips_file_checks_but_not_paths(root):
    assert check(good_record(image="images/missing.png"), root, check_media=False) == []
    assert check(good_record(image="../outside.png"), root, check_media=False) != []


@pytest.mark.parametrize("path", ["../outside.png", "images/../../outside.png", "/etc/hostname"])
def test_paths_escaping_the_data_root_are_refused(root, path):
    (root.parent / "outside.png").write_bytes((root / "images" / "good.png").read_bytes())
    msg = only(check(good_record(image=path), root), "image").message
    assert "outside the data root" in msg or "absolute path" in msg


def test_inner_dotdot_that_stays_inside_is_fine(root):
    assert check(good_record(image="frames/../images/good.png"), root) == []


def video_record(video, marker="<video>"):
    conv = [{"from": "human", "value": f"{marker}\nWhat emotion?"}, {"from": "gpt", "value": "joy"}]
    return good_record(image=..., video=video, conversations=conv, task="emo_o", options=...)


def test_video_frames_fewer_than_asked(root):
    frames = [f"frames/{t:03d}.png" for t in range(3)]
    assert check(video_record(frames), root, num_frames=3) == []
    assert "3 frames, fewer than the 4" in only(check(video_record(frames), root), "video").message
    assert "3 frames, fewer than the 4" in only(check(video_record("frames"), root), "video").message


def test_video_file_frame_count(root):
    from data_pipeline.mini_emobench import save_mp4

    frames = [Image.fromarray(np.full((32, 32, 3), 50 * t, np.uint8)) for t in range(3)]
    save_mp4(frames, root / "clip.mp4")
    assert check(video_record("clip.mp4"), root, num_frames=3) == []
    assert "has 3 frames" in only(check(video_record("clip.mp4"), root, num_frames=5), "video").message
    (root / "bad.mp4").write_bytes(b"\x00\x01garbage" * 50)
    assert "unreadable video" in only(check(video_record("bad.mp4"), root), "video").message


def test_image_and_video_together_is_an_error(root):
    rec = video_record(["frames/000.png"] * 4)
    rec["image"] = "images/good.png"
    assert "not both" in only(check(rec, root), "video").message


def test_label_must_be_among_options(root):
    assert "'sad'" in only(check(good_record(label="sad"), root), "label").message
    assert "duplicates" in only(check(good_record(options=["joy", "joy"]), root), "options").message


def test_text_too_long_for_the_answer(root):
    rec = good_record()
    n = len("\n".join(t["value"] for t in rec["conversations"]))
    assert check(rec, root, max_text_chars=n) == []
    assert "truncated" in only(check(rec, root, max_text_chars=n - 1), "conversations").message
    conv = [{"from": "human", "value": "<image>\none two three four five"},
            {"from": "gpt", "value": "six seven eight nine"}]
    long = good_record(conversations=conv)
    words = lambda s: len(s.split())  # noqa: E731
    assert check(long, root, length_fn=words, max_tokens=10) == []
    err = only(check(long, root, length_fn=words, max_tokens=9), "conversations")
    assert "10 tokens > max_tokens 9" in err.message and "truncated" in err.message


def test_all_problems_are_reported_at_once(root):
    rec = good_record(task="nope", label="sad", image="images/missing.png", extra=1)
    fields = sorted(e.field for e in check(rec, root))
    assert fields == ["extra", "image", "label", "task"]


def test_non_object_record():
    assert only(validate_record([1, 2], source=SRC, line=7, data_root="."), "record")


def test_embedded_bytes_records(root):
    rec = good_record(image=..., image_bytes=(root / "images" / "good.png").read_bytes())
    assert check(rec, root) == []
    assert media_layout(rec, 4) == [1]
    frames = [(root / "frames" / f"{t:03d}.png").read_bytes() for t in range(3)]
    vid = video_record(...)
    vid["video_frames_bytes"] = frames
    assert check(vid, root) == []
    assert media_layout(vid, 4) == [4]
    assert only(check(good_record(image_bytes="abc"), root), "image_bytes")


def test_media_layout():
    assert media_layout(good_record(), 4) == [1]
    assert media_layout(good_record(image=["a.png", "b.png"]), 4) == [1, 1]
    assert media_layout(video_record("v.mp4"), 8) == [8]
    assert media_layout(good_record(image=...), 4) == []


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_iter_records_jsonl_reports_malformed_line(tmp_path):
    good = json.dumps(good_record())
    path = write_lines(tmp_path / "r.jsonl", [good, "", '{"id": "x", "task": ', good, "[1, 2]"])
    with pytest.raises(RecordError) as exc:
        list(iter_records(path))
    assert (exc.value.line, exc.value.field) == (3, "json")
    assert str(exc.value).startswith(f"{path}:3: json: malformed JSON")
    errors = []
    got = list(iter_records(path, errors=errors))
    assert [line for line, _ in got] == [1, 4]  # blank line 2 skipped, bad lines 3 and 5 reported
    assert [(e.line, e.field) for e in errors] == [(3, "json"), (5, "json")]
    assert "expected a JSON object" in errors[1].message


def test_iter_records_json_list(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([good_record(id="a"), good_record(id="b"), "oops"], indent=1))
    errors = []
    assert [(n, r["id"]) for n, r in iter_records(path, errors=errors)] == [(1, "a"), (2, "b")]
    assert [(e.line, e.field) for e in errors] == [(3, "json")]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"id": 1},\n{"id": \n')
    with pytest.raises(RecordError) as exc:
        list(iter_records(bad))
    assert exc.value.line == 4 and exc.value.source == str(bad)
    with pytest.raises(ValueError, match="unsupported"):
        list(iter_records(tmp_path / "r.csv"))


def test_error_budget():
    budget = ErrorBudget(2)
    e1 = RecordError("f.jsonl", 1, "label", "bad")
    e2 = RecordError("f.jsonl", 5, "image", "missing")
    budget.skip([e1])
    budget.skip([e2, e1])
    assert budget.skipped == 2 and budget.by_field == {"label": 2, "image": 1}
    with pytest.raises(ErrorBudgetExceeded) as exc:
        budget.skip([RecordError("f.jsonl", 9, "task", "unknown")])
    msg = str(exc.value)
    assert "3 invalid records skipped (budget 2)" in msg
    assert "label: 2" in msg and "f.jsonl:1: label: bad" in msg
    with pytest.raises(ErrorBudgetExceeded):
        ErrorBudget(0).skip([e1])


def test_data_pipeline_imports_form_no_cycle():
    """The package's modules import one another one way only (storage <- paths <- media <- records <- ...),
    counting imports inside functions too."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parent.parent / "data_pipeline"
    mods = {f.stem for f in pkg.glob("*.py")} - {"__init__"}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((pkg / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "data_pipeline":
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("data_pipeline."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("data_pipeline.")}
        graph[m] = deps & mods - {m}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])

    assert [m for m in sorted(mods) if reaches(m, m)] == []
    assert graph["storage"] == set() and graph["paths"] == {"storage"}
    assert graph["media"] == {"paths", "storage"}
