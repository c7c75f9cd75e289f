"""The Colab notebooks: structure checks, and a top-to-bottom run on the tiny variant (slow)."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "evaluate_emobench.ipynb"
EXPLORE = ROOT / "notebooks" / "explore_mvp.ipynb"


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


@pytest.mark.parametrize("path, param", [(NOTEBOOK, 'VARIANT = "tiny"'),
                                         (EXPLORE, 'CONFIG = "configs/emobench.py:tiny"')])
def test_notebook_structure(path, param):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    install = nb.cells[1].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in install and "if IN_COLAB:" in install
    assert '"jax[tpu]"' in install and '"jax[cuda12]"' in install
    params = _parameters_cell(nb).source
    assert param in params
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") for c in code_cells), "commit notebooks without outputs"
    if path == NOTEBOOK:  # the evaluation notebook shows an audio example
        assert any("log_mel_spectrogram" in c.source and "record_sound" in c.source for c in code_cells)


def _execute(nb):
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    return text, markdown, images


@pytest.mark.slow
def test_notebook_runs_on_tiny(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _parameters_cell(nb).source = "\n".join([
        'VARIANT = "tiny"', f'WORKDIR = "{tmp_path / "work"}"', 'DATA_ROOT = ""', 'INIT_FROM = ""',
        "MINI_SCALE = 0.02", "TRAIN_STEPS = (1, 2)", "EMOPROMPT_M = 1", "MAX_EXAMPLES = 0",
        "USE_DRIVE = False", 'DRIVE_DIR = ""'])
    text, _, images = _execute(nb)
    work = tmp_path / "work"
    assert (work / "eval" / "results.json").exists() and (work / "eval" / "report.md").exists()
    assert "not on Colab" in text and "EmoBench mean accuracy:" in text
    assert "audio example: emo_c-voice-test-" in text   # a voice record, with its waveform and spectrogram
    assert len(images) >= 10  # 8 confusion matrices, the predictions figure, the audio figure
    assert (work / "data" / "test_silent.jsonl").exists()


@pytest.mark.slow
def test_explore_mvp_runs_on_tiny(tmp_path):
    """Trains a 1 + 2 step tiny model with gated MVP, then every figure and table of the notebook."""
    import json
    import re

    nb = nbformat.read(EXPLORE, as_version=4)
    _parameters_cell(nb).source = "\n".join([
        'CONFIG = "configs/emobench.py:tiny"', f'WORKDIR = "{tmp_path / "work"}"', 'INIT_FROM = ""',
        'DATA_ROOT = ""', "MINI_PER_TASK = (4, 3)", "TRAIN_STEPS = (1, 2)",
        'PERSPECTIVES = ("token", "relation", "multilevel", "global")', 'FUSION = "gated_sum"',
        'TASK = "emo_c"', "RECORD_INDEX = 1", "TAU = None", "N_RECORDS = 3"])
    text, markdown, images = _execute(nb)
    assert (tmp_path / "work" / "checkpoints").exists()  # trained the tiny model: there was no checkpoint
    assert "not on Colab" in text and "emo_c-test-00001:" in text  # RECORD_INDEX 1 of the task
    density = float(re.search(r"edge density at tau = 0.5: ([0-9.]+)", text).group(1))
    assert 0.0 <= density <= 1.0
    gates = json.loads(re.search(r"mean gate weights: (\{.*\})", text).group(1).replace("'", '"'))
    assert list(gates) == ["token", "relation", "multilevel", "global"]
    assert sum(gates.values()) == pytest.approx(4.0, abs=1e-4)  # K softmax: the weights sum to K per token
    for removed in ("token", "relation", "multilevel", "global"):
        assert f"without {removed}" in markdown and f"| {removed} |" in markdown
    accuracy = json.loads(re.search(r"accuracy without each perspective: (\{.*\})", text).group(1))
    assert list(accuracy) == ["(none)", "token", "relation", "multilevel", "global"]
    assert len(images) >= 4                            # image, graph, density sweep, gates
