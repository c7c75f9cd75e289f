"""Every mode of `python -m emollm_jax.main` on the tiny variant, as a user runs it: train + eval with each
chat template (`--mode=all`), then `--mode=eval`, `--mode=predict` (image, video, JSONL) and `--mode=plan`;
and gradient accumulation through the training loop: two micro-batches give the losses of one double
batch."""

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.records import iter_records
from data_pipeline.text import TEMPLATES, encode_conversation, load_tokenizer
from emollm_jax.answers import EMOBENCH_TASKS
from emollm_jax.metrics import read_metrics
from tests import cli_setup
from tests.cli_setup import FAST


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return cli_setup.make_data(tmp_path_factory.mktemp("modes") / "data")


@pytest.fixture(scope="module")
def runs(data):
    """template -> (workdir, process) of one `--mode=all` run, made on first use."""
    done = {}

    def get(template):
        if template not in done:
            workdir = data.parent / f"all_{template}"
            # Room for a voice record in the wordiest template (llama3's headers: 164 tokens > tiny's 160).
            done[template] = workdir, cli_setup.main(workdir, f"--config.data.root={data}",
                                                     f"--config.data.template={template}", *FAST,
                                                     "--config.data.max_len=192",
                                                     "--config.data.seq_buckets=(128,192)")
        return done[template]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_train_and_eval_with_each_template(runs, data, template):
    workdir, proc = runs(template)
    assert json.loads((workdir / "config.json").read_text())["data"]["template"] == template
    losses = [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")]
    assert len(losses) == 2 and all(np.isfinite(losses))
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["splits"]["test"]["emobench_tasks"] == list(EMOBENCH_TASKS)
    assert "EmoBench mean" in proc.stdout
    # The run's tokenizer was made for this template: a prompt rendered with it has no unknown token.
    tok = load_tokenizer(workdir / "tokenizer")
    _, record = next(iter_records(data / "train.jsonl"))
    ids, _ = encode_conversation(record["conversations"], template, tok, visual_tokens=[1],
                                 for_generation=False)
    unk = tok.token_to_id("<unk>")
    assert unk is None or unk not in ids


@pytest.mark.slow
def test_eval_mode_reads_the_checkpoint(runs):
    workdir, _ = runs("vicuna_v1")
    first = json.loads((workdir / "eval" / "results.json").read_text())
    (workdir / "eval" / "results.json").unlink()
    cli_setup.main(workdir, "--mode=eval", *FAST)
    again = json.loads((workdir / "eval" / "results.json").read_text())
    assert again["checkpoint"].endswith("step 2") and first["checkpoint"] == "in-memory model"
    assert again["accuracy"] == first["accuracy"]  # the checkpoint holds the params `all` evaluated
    preds = [json.loads(line) for line in (workdir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert {p["task"] for p in preds} >= set(EMOBENCH_TASKS)


@pytest.mark.slow
@pytest.mark.parametrize("media", ["image", "video"])
def test_predict_one_image_or_video(runs, data, media):
    workdir, _ = runs("vicuna_v1")
    task = "emo_c" if media == "image" else "emo_o"
    records = [r for split in ("test", "train") for _, r in iter_records(data / f"{split}.jsonl")]
    record = next(r for r in records if r["task"] == task and media in r)  # video: an .mp4 file
    path = data / record[media]
    proc = cli_setup.main(workdir, "--mode=predict", f"--{media}={path}", f"--task={task}",
                          f"--question={record['conversations'][0]['value']}", *FAST)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("predict-0: "))
    assert line.endswith("]") and f"[{task}: " in line  # the answer, then the parsed label (or None)


@pytest.mark.slow
def test_predict_jsonl(runs, data):
    workdir, _ = runs("vicuna_v1")
    records = [r for _, r in iter_records(data / "test.jsonl")][:3]
    requests = data / "requests.jsonl"  # media paths are relative to the JSONL file's directory
    free = {"id": "free", "question": "Describe it.", "image": records[0]["image"]}
    requests.write_text("".join(json.dumps(r) + "\n" for r in [*records, free]))
    cli_setup.main(workdir, "--mode=predict", f"--jsonl={requests}", *FAST)
    rows = [json.loads(x) for x in (workdir / "predict" / "outputs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in records] + ["free"]
    assert all(isinstance(r["answer"], str) for r in rows) and rows[-1]["parsed"] is None


@pytest.mark.slow
def test_plan_mode_shows_a_lora_stage_next_to_full_fine_tuning(tmp_path):
    proc = cli_setup.main(tmp_path / "w", "--mode=plan", "--plan_devices=1", "--config.mesh.data=1",
                          "--config.model.vision.num_layers=1", "--config.model.text.num_layers=1",
                          "--config.model.projector.levels=(-1, -2)", "--config.lora.rank=4",
                          "--config.stage_order=('emotional',)",
                          "--config.stages.emotional.trainable=('lora', 'projector')")
    lines = [x for x in proc.stdout.splitlines() if x.startswith("stage ")]
    assert [x.split(":")[0] for x in lines] == ["stage emotional", "stage emotional (full fine-tuning)"]
    assert all("fits in 16 GiB" in x for x in lines)
    assert not (tmp_path / "w").exists()  # the plan writes nothing


def _accum_run(data: Path, workdir: Path, batch: int, accum: int, steps: int) -> list[float]:
    """The step-call losses of a run of binary-task records (every answer is one word: each micro-batch
    holds as many supervised tokens as the next, so the mean of two micro-batch means is the batch mean)."""
    stage = "--config.stages.emotional."
    cli_setup.main(workdir, "--mode=train", f"--config.data.root={data}",
                   "--config.stage_order=('emotional',)", f"{stage}tasks=('hate', 'humor', 'sarcasm')",
                   f"{stage}steps={steps}",
                   f"{stage}batch_size={batch}", f"{stage}grad_accum={accum}", f"{stage}warmup_ratio=0.0",
                   "--config.train.log_every=1", f"--config.train.checkpoint_every={10 * steps}")
    return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_gradient_accumulation_equals_the_double_batch(tmp_path):
    data = cli_setup.make_data(tmp_path / "data", train_per_task=8)
    double = _accum_run(data, tmp_path / "double", batch=8, accum=1, steps=3)
    micro = _accum_run(data, tmp_path / "micro", batch=8, accum=2, steps=3)
    assert len(double) == 3 and len(micro) == 6
    pairs = np.asarray(micro).reshape(3, 2).mean(axis=1)  # the two halves of each double batch
    np.testing.assert_allclose(pairs, double, rtol=1e-5, atol=1e-5)
    assert abs(double[2] - double[0]) > 1e-3  # the updates between them did move the model


@pytest.mark.slow
def test_exports_a_run_cannot_give_are_one_error_line(runs, tmp_path):
    """The tiny run has no adapters and an MVP projector (no HF Llava form)."""
    workdir, _ = runs("vicuna_v1")
    refused = (("--lora_only", "has no LoRA adapters to export"), ("--to_hf", "no HF Llava counterpart"))
    for flag, why in refused:
        proc = cli_setup.run("emollm_jax.convert", "--workdir", workdir, flag, "--out", tmp_path / "out",
                             cwd=tmp_path, check=False)
        assert proc.returncode == 2 and why in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
        assert not (tmp_path / "out").exists()
