"""Config -> the things every mode needs: data root, tokenizer, `EmoLLMConfig`, initial weights.

Shared by train, eval, predict and plan so they agree on the model a workdir holds. The tiny variant's data
(mini-EmoBench) and tokenizer are created here on first use, inside the workdir, and reused afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from emollm_jax.configuration import Section
from emollm_jax.models.emollm import EmoLLM, EmoLLMConfig, audio_parts
from emollm_jax.pytree import flat_leaves

log = logging.getLogger(__name__)
# Written at audio positions when the tokenizer has no <audio> token (as original LLaVA's -200 for images):
# the model replaces it before any embedding lookup, so it need not be in the vocabulary.
AUDIO_TOKEN_ID = -201


@dataclasses.dataclass(frozen=True)
class InitConfig(Section):
    """`config.init`: where the initial weights come from (empty: random initialisation)."""

    hf: str = ""      # an HF LLaVA/EmoLLM dir, or the conversion CLI's orbax output (whole model)
    llm: str = ""     # HF decoder dir (Vicuna / LLaMA)
    vision: str = ""  # HF CLIP vision dir
    audio: str = ""   # HF Whisper dir (WhisperModel / WhisperForConditionalGeneration / encoder only)
    params: str = ""  # orbax params-only checkpoint of the whole EmoLLM


@dataclasses.dataclass(frozen=True)
class DataSetup:
    """Where the records live and which tokenizer reads them."""

    root: str
    tokenizer_path: str
    image_token_id: int | None = None  # used when the tokenizer has no <image> token (LLaVA's -200)
    audio_token_id: int | None = None  # used when the tokenizer has no <audio> token; None: no audio tower


def model_config(config: ml_collections.ConfigDict, *, vocab_size: int | None = None,
                 image_token_id: int | None = None, audio_token_id: int | None = None,
                 freeze_vision: bool = True) -> EmoLLMConfig:
    """`EmoLLMConfig` from `config.model`; `vocab_size` / `image_token_id` fill the "from tokenizer" values
    (0 / -1); `audio_token_id` (the tokenizer's, when it has an `<audio>` token) wins over
    `config.model.audio_token_id`. A configured vocabulary smaller than the tokenizer's is an error (ids
    would fall off it)."""
    m = config.model
    vocab = int(m.text.vocab_size)
    if vocab <= 0:
        if vocab_size is None:
            raise ValueError("config.model.text.vocab_size is 0 (from tokenizer) but no tokenizer was given")
        vocab = vocab_size
    elif vocab_size is not None and vocab_size > vocab:
        raise ValueError(f"config.model.text.vocab_size={vocab} < tokenizer vocab {vocab_size}")
    # The tokenizer's id wins: it is what the pipeline writes. The config's id (-1 = from the tokenizer) only
    # tells a tokenizer without an <image> token which id to use, e.g. original LLaVA's out-of-vocab -200.
    image_id = image_token_id if image_token_id is not None else m.image_token_id
    if image_id == -1:
        raise ValueError("config.model.image_token_id is -1 (from tokenizer) but no tokenizer was given")
    audio_id = audio_token_id if audio_token_id is not None else int(m.get("audio_token_id", AUDIO_TOKEN_ID))
    return EmoLLMConfig.from_config(m, vocab_size=vocab, image_token_id=image_id, audio_token_id=audio_id,
                                    freeze_vision=freeze_vision)


def _record_texts(root: str, split: str, template: str = "vicuna_v1") -> list[str]:
    """All conversation text of the `split` record files under `root`, for the tiny tokenizer, plus what every
    prompt adds around it: the chat template's system text and role words, and rendered EmoPrompt exemplars
    ("Example:" / "Reasoning:" / "Answer:"). Without these they would all read as `<unk>`."""
    from data_pipeline.records import iter_records
    from data_pipeline.text import get_template
    from emollm_jax import emoprompt

    files = sorted(Path(root).glob(f"{split}*.json")) + sorted(Path(root).glob(f"{split}*.jsonl"))
    if not files:
        raise FileNotFoundError(f"{root}: no {split}*.json / {split}*.jsonl records to train a tokenizer on")
    texts, records = [], []
    for file in files:
        for _, rec in iter_records(file):
            records.append(rec)
            texts.extend(turn["value"] for turn in rec["conversations"])
            texts.extend(rec.get("options") or [])
            if rec.get("rationale"):
                texts.append(rec["rationale"])
    texts.extend(emoprompt.render(items) for items in emoprompt.build_from_records(records, 1).values())
    tmpl = get_template(template)
    texts.extend(p.text for p in tmpl.render(tmpl.system, [("question", "answer")], False) if p.text)
    return texts


def prepare_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> DataSetup:
    """Data root and tokenizer path; generates mini-EmoBench and trains the tiny tokenizer when the config
    leaves them empty. Only process 0 writes; the others wait at a barrier, then read the same files."""
    workdir = Path(workdir)
    root = config.data.root or str(workdir / "data")
    tok_path = config.data.tokenizer or config.init.llm or config.init.hf or str(workdir / "tokenizer")
    must_generate = not config.data.root and not (workdir / "data" / "card.json").exists()
    must_tokenize = not (config.data.tokenizer or config.init.llm or config.init.hf) and not (
        Path(tok_path) / "tokenizer.json").exists()
    if jax.process_index() == 0:
        if must_generate:
            _generate_mini(config, root)
        if must_tokenize:
            from data_pipeline.text import train_tiny_tokenizer

            log.info("training the tiny word-level tokenizer into %s", tok_path)
            from emollm_jax.data import template_name

            texts = _record_texts(root, config.data.train_split, template_name(config))
            train_tiny_tokenizer(texts, tok_path)
    if jax.process_count() > 1:  # always: the others' view of must_* may already see process 0's files
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("emollm_jax.prepare_data")
    image_id = int(config.model.image_token_id)
    has_audio = audio_parts(config.model)[0] is not None
    audio_id = int(config.model.get("audio_token_id", AUDIO_TOKEN_ID)) if has_audio else None
    return DataSetup(root=root, tokenizer_path=tok_path, image_token_id=None if image_id == -1 else image_id,
                     audio_token_id=audio_id)


def _generate_mini(config: ml_collections.ConfigDict, root: str) -> None:
    """mini-EmoBench at the configured sizes; its voice records only for a model with an audio tower."""
    from data_pipeline import mini_emobench

    log.info("generating mini-EmoBench into %s", root)
    n_train, n_test = int(config.data.mini_train_per_task), int(config.data.mini_test_per_task)

    def sized(default: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        return {task: (n_train or train, n_test or test) for task, (train, test) in default.items()}

    sound = sized(mini_emobench.SOUND_SIZES) if audio_parts(config.model)[0] is not None else None
    mini_emobench.generate(root, seed=int(config.seed), sizes=sized(mini_emobench.DEFAULT_SIZES),
                           sound_sizes=sound, video_files=bool(config.data.mini_video_files))


def load_tokenizer(setup: DataSetup):
    """The run's tokenizer (data_pipeline.text.Tokenizer)."""
    from data_pipeline.text import load_tokenizer as _load

    return _load(setup.tokenizer_path, image_token_id=setup.image_token_id,
                 audio_token_id=setup.audio_token_id)


def new_model(cfg: EmoLLMConfig, seed: int) -> EmoLLM:
    return EmoLLM(cfg, rngs=nnx_rngs(seed))


def nnx_rngs(seed: int):
    from flax import nnx

    return nnx.Rngs(params=seed)


def load_initial_weights(config: ml_collections.ConfigDict, model: EmoLLM,
                         init_from: str | None = None) -> None:
    """Overwrites `model`'s parameters in place from `--init_from` / `config.init.*`.

    `hf` / `init_from`: a whole-model HF dir (LLaVA layout) or the conversion CLI's orbax output; `llm`,
    `vision` and `audio`: HF dirs for one tower each (LLaVA-1.5 recipe: pretrained towers, fresh projectors);
    `params`: an orbax params-only checkpoint of this EmoLLM (audio parts included).
    """
    from flax import nnx

    whole = init_from or config.init.hf
    sources = []
    if whole:
        sources.append(("", whole))
    if config.init.llm:
        sources.append(("llm", config.init.llm))
    if config.init.vision:
        sources.append(("vision", config.init.vision))
    if config.init.get("audio"):
        if model.audio is None:
            raise ValueError(f"config.init.audio={config.init.audio}: the model has no audio tower "
                             "(config.model.audio.kind='none')")
        sources.append(("audio", config.init.audio))
    for part, path in sources:
        target = getattr(model, part) if part else model
        # The conversion CLI's output holds a model without audio parts: read it as a model, to take the parts
        # it shares with one that has them (a plain restore would miss the audio keys).
        converted = not part and model.audio is not None and (Path(path) / "convert.json").is_file()
        if Path(path).is_dir() and ((Path(path) / "config.json").exists() or converted):
            from emollm_jax.convert import load_hf
            from emollm_jax.convert.orbax_params import load_params

            dtype = (model.config.audio if part == "audio" else model.config.text).param_dtype
            loaded = load_params(path) if converted else load_hf(path, dtype=dtype)
            if part in ("vision", "audio") and isinstance(loaded, EmoLLM):
                loaded = getattr(loaded, part)
            kept = _shared_parts(loaded, model) if not part else None
            if kept is not None:
                # A LLaVA checkpoint under an MVP (or other) projector, or without the configured audio
                # parts: take the parts it shares with the model, keep the others freshly initialised
                # (LLaVA-1.5's recipe for a new projector).
                log.info("%s holds the model's %s; the configured %s start fresh", path, ", ".join(kept),
                         ", ".join(p for p in _PARTS if p not in kept and getattr(model, p) is not None))
                _load_parts(model, loaded, kept, path)
                continue
            new = nnx.state(loaded, nnx.Param)
        else:
            from emollm_jax.checkpoint import restore_params

            new = restore_params(path, nnx.state(target, nnx.Param), None)
        old = nnx.state(target, nnx.Param)
        _check_same_shapes(old, new, f"{'config.init.' + part if part else 'init_from'}={path}")
        nnx.update(target, new)
        log.info("loaded %s weights from %s", part or "model", path)
    if config.init.params:
        from emollm_jax.checkpoint import restore_params

        new = restore_params(config.init.params, nnx.state(model, nnx.Param), None)
        nnx.update(model, new)
        log.info("loaded params from %s", config.init.params)


_PARTS = ("llm", "vision", "projector", "audio", "audio_projector")


def _load_parts(model: EmoLLM, loaded: EmoLLM, parts: list[str], path: str) -> None:
    """Copies `parts` of `loaded` into `model`, cast to `model`'s parameter dtypes."""
    from flax import nnx

    for name in parts:
        old = nnx.state(getattr(model, name), nnx.Param)
        new = nnx.state(getattr(loaded, name), nnx.Param)
        _check_same_shapes(old, new, f"init_from={path} ({name})")
        nnx.update(getattr(model, name), jax.tree.map(lambda n, o: n.astype(o.dtype), new, old))


def _shared_parts(loaded: Any, model: EmoLLM) -> list[str] | None:
    """The parts a loaded whole EmoLLM shares with `model` when its projector or its audio parts differ from
    the configured ones (None when it is the configured model, or not an EmoLLM)."""
    if not isinstance(loaded, EmoLLM):
        return None
    same = {"llm": True, "vision": True}
    for name in ("projector", "audio", "audio_projector"):
        mine, theirs = getattr(model.config, name), getattr(loaded.config, name)
        same[name] = mine is not None and mine == theirs
    if all(same[p] or getattr(model.config, p) is None for p in same):
        return None
    return [p for p in _PARTS if same[p]]


def _check_same_shapes(old: Any, new: Any, where: str) -> None:
    o = {k: v.shape for k, v in flat_leaves(old).items()}
    n = {k: v.shape for k, v in flat_leaves(new).items()}
    missing, extra = sorted(set(o) - set(n)), sorted(set(n) - set(o))
    if missing or extra:
        raise ValueError(f"{where}: parameters differ from the configured model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    bad = [(k, n[k], o[k]) for k in o if tuple(n[k]) != tuple(o[k])]
    if bad:
        raise ValueError(f"{where}: shape mismatch (path, loaded, configured) {bad[:5]}")


