"""The Colab notebooks: structure checks, and a top-to-bottom run on the tiny variant (slow)."""

from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "evaluate_emobench.ipynb"


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged 'parameters'"
    return cells[0]


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    install = nb.cells[1].source
    assert 'IN_COLAB = "google.colab" in sys.modules' in install and "if IN_COLAB:" in install
    assert '"jax[tpu]"' in install and '"jax[cuda12]"' in install
    params = _parameters_cell(nb).source
    assert 'VARIANT = "tiny"' in params
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") for c in code_cells), "commit notebooks without outputs"
    assert any("log_mel_spectrogram" in c.source and "record_sound" in c.source for c in code_cells)


@pytest.mark.slow
def test_notebook_runs_on_tiny(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _parameters_cell(nb).source = "\n".join([
        'VARIANT = "tiny"', f'WORKDIR = "{tmp_path / "work"}"', 'DATA_ROOT = ""', 'INIT_FROM = ""',
        "MINI_SCALE = 0.02", "TRAIN_STEPS = (1, 2)", "EMOPROMPT_M = 1", "MAX_EXAMPLES = 0",
        "USE_DRIVE = False", 'DRIVE_DIR = ""'])
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    work = tmp_path / "work"
    assert (work / "eval" / "results.json").exists() and (work / "eval" / "report.md").exists()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "not on Colab" in text and "EmoBench mean accuracy:" in text
    assert "audio example: emo_c-voice-test-" in text   # a voice record, with its waveform and spectrogram
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 10  # 8 confusion matrices, the predictions figure, the audio figure
    assert (work / "data" / "test_silent.jsonl").exists()
