"""Training logs: a tqdm bar per stage, `metrics.jsonl`, TensorBoard scalars, and loss-curve PNGs.

Only process 0 writes (`enabled=False` elsewhere), so multi-host runs produce one log. Each JSON line is one
`os.write` on an O_APPEND descriptor: a killed run leaves whole lines, and a resumed run appends after them
(a step run twice appears twice; readers keep the last occurrence, see `read_metrics`). In a workdir on an
object store, metrics.jsonl and the TensorBoard events are written to a local copy uploaded whole every
30 s and at the end (`data_pipeline.storage.Mirror`): a killed run's store copy lags by at most that.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable
from typing import Any

from data_pipeline import storage

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl, one per (stage, step): a re-run step keeps its latest record."""
    latest: dict[tuple, dict] = {}
    for line in storage.path(path).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[(rec.get("stage"), rec.get("step"), rec.get("kind", "train"))] = rec
    return sorted(latest.values(), key=lambda r: r.get("step", 0))


class MetricsLogger:
    """Appends records to `<workdir>/metrics.jsonl` and mirrors numeric fields to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
        self.workdir = storage.path(workdir)
        self.enabled = enabled
        self._fd: int | None = None
        self._tb = None
        self._mirrors: list[storage.Mirror] = []
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._metrics = storage.Mirror(self.workdir / METRICS_FILE)
        self._mirrors.append(self._metrics)
        self._fd = os.open(self._metrics.local, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if tensorboard:
            from tensorboardX import SummaryWriter

            events = storage.Mirror(self.workdir / "tensorboard", interval=60.0, directory=True)
            self._mirrors.append(events)
            self._tb = SummaryWriter(events.local)

    def write(self, record: dict[str, Any]) -> None:
        """One JSON line (step, stage, loss, lr, grad_norm, tokens_per_s, mfu, ...) + TensorBoard scalars."""
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        os.write(self._fd, (json.dumps(rec) + "\n").encode())
        self._metrics.push()
        step = int(rec.get("step", 0))
        if self._tb is not None:
            for key, value in rec.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"{rec.get('kind', 'train')}/{key}", value, step)

    def plot(self, stages: Iterable[str] | None = None) -> list[Any]:
        """Writes `loss_<stage>.png` for each stage seen by this process (curves of the whole run when the
        metrics file holds earlier, resumed-from records). Returns the files written."""
        if not self.enabled:
            return []
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        history: dict[str, list[tuple[int, float]]] = {}
        path = self._metrics.local
        for rec in read_metrics(path) if os.path.exists(path) else []:
            if rec.get("kind", "train") == "train" and isinstance(rec.get("loss"), (int, float)):
                history.setdefault(rec.get("stage", ""), []).append((rec["step"], rec["loss"]))
        written = []
        for stage in stages or sorted(history):
            points = history.get(stage)
            if not points:
                continue
            fig = Figure(figsize=(6, 4))  # a bare Agg figure: pyplot's global backend is left alone
            FigureCanvasAgg(fig)
            ax = fig.subplots()
            ax.plot([p[0] for p in points], [p[1] for p in points])
            ax.set(xlabel="step", ylabel="loss (answer tokens)", title=f"stage {stage}", yscale="log")
            ax.grid(alpha=0.3)
            out = self.workdir / f"loss_{stage}.png"
            save = functools.partial(fig.savefig, format="png", dpi=100, bbox_inches="tight")
            storage.atomic_write(out, save, binary=True)
            written.append(out)
        return written

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        for mirror in self._mirrors:
            mirror.push()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for mirror in self._mirrors:
            mirror.close()
        self._mirrors = []


class StageProgress:
    """tqdm bar for one stage: loss, tokens/s and tqdm's own ETA; silent when disabled."""

    def __init__(self, stage: str, total: int, initial: int = 0, *, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=f"stage {stage}", unit="step",
                             dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
