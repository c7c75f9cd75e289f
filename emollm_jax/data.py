"""`config.data`: where the records and the tokenizer come from and how they become training sequences."""

from __future__ import annotations

import dataclasses

from data_pipeline.text import TEMPLATES
from emollm_jax.configuration import Section


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """`config.data`. Empty `root` / `tokenizer`: mini-EmoBench is generated into the workdir and the tiny
    word-level tokenizer is trained on it. Empty `template`: the decoder's own chat template."""

    root: str = ""                 # EmoBench root with train/test record files
    tokenizer: str = ""            # HF tokenizer dir or tokenizer.json
    template: str = ""             # a data_pipeline.text.TEMPLATES name
    max_len: int = 256             # longest training sequence (visual tokens included)
    seq_buckets: tuple[int, ...] = ()  # padded lengths, one compile each; empty: (max_len,)
    num_frames: int = 4            # frames sampled per video
    train_split: str = "train"
    eval_split: str = "test"
    num_workers: int = 0           # grain worker processes (0: in-process)
    mini_train_per_task: int = 0   # mini-EmoBench train records per task; 0 = the generator's default
    mini_test_per_task: int = 0    # mini-EmoBench test records per task; 0 = the generator's default
    mini_video_files: bool = False

    def check(self) -> None:
        if self.template and self.template not in TEMPLATES:
            self.fail("template", f"unknown chat template; expected '' or one of {tuple(TEMPLATES)}")
        if self.max_len <= 0:
            self.fail("max_len", "must be positive")
        buckets = list(self.seq_buckets)
        if buckets and (buckets != sorted(set(buckets)) or buckets[0] <= 0):
            self.fail("seq_buckets", "must be positive and strictly increasing")
        if self.num_frames <= 0:
            self.fail("num_frames", "must be positive")
        for field in ("num_workers", "mini_train_per_task", "mini_test_per_task"):
            if getattr(self, field) < 0:
                self.fail(field, "must be >= 0")
        if not self.train_split or not self.eval_split:
            self.fail("train_split" if not self.train_split else "eval_split", "must name a split")
