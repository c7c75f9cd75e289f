"""Config -> the things every mode needs: data root, tokenizer, `EmoLLMConfig`, initial weights.

Shared by train, eval, predict and plan so they agree on the model a workdir holds. The tiny variant's data
(mini-EmoBench) and tokenizer are created here on first use, inside the workdir, and reused afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from data_pipeline import storage
from emollm_jax import init_config, lora
from emollm_jax.configuration import ConfigError, Section
from emollm_jax.lora import LoRAConfig
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
                 freeze_vision: bool = True, init_from: str | None = None) -> EmoLLMConfig:
    """`EmoLLMConfig` from `config.model`, its parts filled from the pretrained checkpoints' own configs
    (`init_config.resolve`), with `config.lora`'s adapters; `vocab_size` / `image_token_id` fill the "from
    tokenizer" values (0 / -1); `audio_token_id` (the tokenizer's, when it has an `<audio>` token) wins over
    `config.model.audio_token_id`. A configured vocabulary smaller than the tokenizer's is an error (ids
    would fall off it)."""
    config = init_config.resolve(config, init_from)
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
    cfg = EmoLLMConfig.from_config(m, vocab_size=vocab, image_token_id=image_id, audio_token_id=audio_id,
                                   freeze_vision=freeze_vision)
    adapters = LoRAConfig.from_config(config.lora, "lora") if "lora" in config else None
    return dataclasses.replace(cfg, lora=adapters if adapters is not None and adapters.enabled else None)


def _record_texts(root: str, split: str, template: str = "vicuna_v1", *, sources: Sequence[Any] = (),
                  max_tokens: int | None = None) -> list[str]:
    """The text of the records the tiny tokenizer may learn from, plus what every prompt adds around it: the
    chat template's system text and role words, and rendered EmoPrompt exemplars ("Example:" / "Reasoning:"
    / "Answer:"). Without these they would all read as `<unk>`.

    Records: those of `sources` (`data_pipeline.sources.SourceSpec`s; empty: `<root>/<split>.jsonl`) that
    pass the schema checks, with duplicate ids and, when `max_tokens` is given, records whose text alone is
    longer than that left out: training would reject them, so nothing is learnt from them first.
    """
    from data_pipeline import pipeline
    from data_pipeline.records import ErrorBudget
    from data_pipeline.sources import SourceSpec
    from data_pipeline.text import get_template, tiny_token_count
    from emollm_jax import emoprompt

    sources = tuple(sources) or (SourceSpec(storage.join(root, f"{split}.jsonl")),)
    spec = pipeline.PipelineSpec(sources=sources, tokenizer="", data_root=root or None)
    rejected = ErrorBudget(1 << 62)
    texts, records, too_long = [], [], []
    for example in pipeline.valid_records(spec, rejected):
        rec = example["record"]
        turns = [turn["value"] for turn in rec["conversations"]]
        if max_tokens is not None and tiny_token_count("\n".join(turns)) > max_tokens:
            too_long.append(f"{example['source']}:{example['line']}")
            continue
        records.append(rec)
        texts.extend(turns)
        texts.extend(rec.get("options") or [])
        if rec.get("rationale"):
            texts.append(rec["rationale"])
    if rejected.skipped or too_long:
        log.warning("tokenizer: learnt from %d records; left out %d invalid (%s) and %d longer than %s "
                    "tokens (%s); training reports them", len(records), rejected.skipped,
                    "; ".join(map(str, rejected.examples[:3])) or "-", len(too_long), max_tokens,
                    ", ".join(too_long[:3]) or "-")
    texts.extend(emoprompt.render(items) for items in emoprompt.build_from_records(records, 1).values())
    tmpl = get_template(template)
    texts.extend(p.text for p in tmpl.render(tmpl.system, [("question", "answer")], False) if p.text)
    return texts


# Config keys naming inputs that must exist, and what they must be (checked before anything is written).
INPUT_PATHS = (("data.root", "dir"), ("data.tokenizer", "any"), ("init.hf", "dir"), ("init.llm", "dir"),
               ("init.vision", "dir"), ("init.audio", "dir"), ("init.params", "dir"))


def check_paths(config: ml_collections.ConfigDict, init_from: str | None = None,
                keys: tuple[str, ...] | None = None) -> None:
    """Refuses a configured input path that does not exist, naming its key (`ConfigError`): before a run
    writes anything, not later as a tokenizer or checkpoint problem. `init_from` is the `--init_from` flag;
    `keys` limits the check to some of INPUT_PATHS."""
    checks = []
    for key, kind in INPUT_PATHS:
        if keys is not None and key not in keys:
            continue
        block, field = key.split(".")
        checks.append((f"config.{key}", config[block][field], kind))
    checks.append(("--init_from", init_from or "", "dir"))
    for name, value, kind in checks:
        if not value:
            continue
        path = storage.path(value if storage.is_remote(value) else os.path.expanduser(value))
        if kind == "dir" and not path.is_dir():
            what = "not a directory" if path.exists() else "no such directory"
            raise ConfigError(f"{name}={value}: {what}")
        if kind == "any" and not path.exists():
            raise ConfigError(f"{name}={value}: no such file or directory")


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
    """The run's tokenizer: `config.data.tokenizer`, else the pretrained decoder's (`init.llm` / `init.hf`),
    else the tiny one trained into `<workdir>/tokenizer`."""
    return config.data.tokenizer or config.init.llm or config.init.hf or storage.join(workdir, "tokenizer")


def prepare_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> DataSetup:
    """Data root and tokenizer path; generates mini-EmoBench when the config names no data (neither
    `data.root` nor `data.sources` of the training split) and trains the tiny tokenizer on the valid training
    records when it names no tokenizer. Only process 0 writes; the others wait at a barrier, then read the
    same files. The configured paths it reads are checked first, by key (`check_paths`)."""
    from emollm_jax.data import has_sources, split_sources, template_name

    workdir = storage.path(workdir)
    train_split = config.data.train_split
    named = bool(config.data.root) or has_sources(config, train_split)
    root = config.data.root or ("" if named else str(workdir / "data"))
    tokenizer_keys = (("data.tokenizer", config.data.tokenizer), ("init.llm", config.init.llm),
                      ("init.hf", config.init.hf))
    tok_key = next((key for key, value in tokenizer_keys if value), None)
    tok_path = tokenizer_path(config, workdir)
    must_generate = not named and not (workdir / "data" / "card.json").exists()
    must_tokenize = not (config.data.tokenizer or config.init.llm or config.init.hf) and not (
        storage.path(tok_path) / "tokenizer.json").exists()
    check_paths(config, keys=(tok_key,) + (("data.root",) if must_tokenize else ()))  # what is read here
    if jax.process_index() == 0:
        if must_generate:
            _generate_mini(config, root)
        if must_tokenize:
            from data_pipeline.text import train_tiny_tokenizer

            log.info("training the tiny word-level tokenizer into %s", tok_path)
            sources, _ = split_sources(config, train_split, root)
            texts = _record_texts(root, train_split, template_name(config), sources=sources,
                                  max_tokens=int(config.data.max_len))
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
    """The run's model: `cfg`'s parts with random weights from `seed`, and its LoRA adapters (`cfg.lora`).
    Every mode builds its model here (training, its abstract shapes, evaluation, prediction, the plan)."""
    model = EmoLLM(cfg, rngs=nnx_rngs(seed))
    if cfg.lora is not None:
        lora.apply_config(model, cfg.lora, seed)
    return model


def load_run(workdir: str | os.PathLike, step: int | None = None) -> tuple[EmoLLM, ml_collections.ConfigDict]:
    """(model, config) of a training run: `<workdir>/config.json`, the run's tokenizer (for the vocabulary)
    and the params of checkpoint `step` (default: the latest), adapters included."""
    from emollm_jax.checkpoint import restore_params

    workdir = storage.path(workdir)
    try:
        config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{workdir}: no config.json; not a training run's workdir") from None
    image_id = int(config.model.image_token_id)
    setup = DataSetup(root=config.data.root, tokenizer_path=tokenizer_path(config, workdir),
                      image_token_id=None if image_id == -1 else image_id)
    tokenizer = load_tokenizer(setup)
    cfg = model_config(config, vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_token_id)
    model = new_model(cfg, int(config.seed))
    ckpt = workdir / "checkpoints" / (str(step) if step is not None else "")
    nnx.update(model, restore_params(ckpt, nnx.state(model, nnx.Param), None))
    log.info("loaded %s (%d LoRA adapters)", ckpt, len(lora.adapters(model)))
    return model, config


def nnx_rngs(seed: int) -> nnx.Rngs:
    return nnx.Rngs(params=seed)


def load_initial_weights(config: ml_collections.ConfigDict, model: EmoLLM,
                         init_from: str | None = None) -> None:
    """Overwrites `model`'s parameters in place from `--init_from` / `config.init.*`.

    `hf` / `init_from`: a whole model: an HF dir (LLaVA layout), the conversion CLI's output, or an orbax
    params checkpoint of this EmoLLM; `llm`, `vision` and `audio`: one tower each, from an HF or converted dir
    of the tower alone or of a whole model (LLaVA-1.5 recipe: pretrained towers, fresh projectors), taking the
    place of the whole model's tower; `params`: an orbax params checkpoint of this EmoLLM (audio parts
    included). A whole model whose projector or audio parts differ from the configured ones gives the parts
    it shares; the others start fresh. LoRA adapters are taken from a checkpoint that has them, and otherwise
    start fresh (B = 0).
    """
    whole = init_from or config.init.hf
    towers = [part for part in ("llm", "vision", "audio") if config.init.get(part)]
    if whole:
        key = "init_from" if init_from else "config.init.hf"
        _load_whole(model, whole, skip=towers, where=f"{key}={whole}")
    for part in towers:
        _load_part(model, part, config.init[part], f"config.init.{part}={config.init[part]}")
    if config.init.params:
        _restore_into(model, config.init.params, f"config.init.params={config.init.params}")
        log.info("loaded params from %s", config.init.params)


_BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # the parameters a checkpoint without adapters holds


def read_model(path: str | os.PathLike, dtype: str | None = None) -> Any | None:
    """The model an HF dir or a converted dir (`python -m emollm_jax.convert` output) holds, or None for
    anything else (an orbax params checkpoint needs a target to restore into)."""
    from emollm_jax.convert.orbax_params import load_model_dir

    return load_model_dir(path, dtype=dtype)


def _load_whole(model: EmoLLM, path: str, skip: list[str], where: str) -> None:
    """A whole model into `model`, but for the towers in `skip` (another source gives them)."""
    loaded = read_model(path, dtype=model.config.text.param_dtype)
    if loaded is None:
        _restore_into(model, path, where)
        log.info("loaded model weights from %s", path)
        return
    if not isinstance(loaded, EmoLLM):
        raise ValueError(f"{where}: holds a {type(loaded).__name__}, not a whole EmoLLM / Llava; give a "
                         "decoder as config.init.llm and a tower as config.init.vision")
    parts = [p for p in _PARTS if p not in skip and getattr(model, p) is not None]
    fresh = [p for p in parts
             if p not in ("llm", "vision") and getattr(loaded.config, p) != getattr(model.config, p)]
    if fresh:
        # A LLaVA checkpoint under an MVP (or other) projector, or without the configured audio parts: take
        # the parts it shares, keep the others freshly initialised (LLaVA-1.5's recipe for a new projector).
        log.info("%s holds other %s than the config (%s): loading %s, the configured ones start fresh", path,
                 " / ".join(fresh), ", ".join(_kind(loaded.config, p) for p in fresh),
                 " + ".join(p for p in parts if p not in fresh))
        parts = [p for p in parts if p not in fresh]
    for part in parts:
        _update_base(getattr(model, part), getattr(loaded, part), f"{where} ({part})")
    log.info("loaded %s weights from %s", " + ".join(parts), path)


def _load_part(model: EmoLLM, part: str, path: str, where: str) -> None:
    """One tower ("llm", "vision", "audio") from `path`: that tower alone, a whole model's, or a params
    checkpoint."""
    target = getattr(model, part)
    if target is None:
        raise ValueError(f"{where}: the model has no {part} tower (config.model.{part}.kind='none')")
    dtype = (model.config.audio if part == "audio" else model.config.text).param_dtype
    loaded = read_model(path, dtype=dtype)
    if loaded is None:
        _restore_into(target, path, where)
    else:
        if isinstance(loaded, EmoLLM):
            loaded = getattr(loaded, part)  # one tower of a whole LLaVA
        _update_base(target, loaded, where)
    log.info("loaded %s weights from %s", part, path)


def _update_base(target: nnx.Module, loaded: nnx.Module, where: str) -> None:
    """`loaded`'s parameters into `target`'s non-adapter ones (same paths and shapes), in `target`'s
    dtypes."""
    old = nnx.state(target, _BASE)
    new = _as_layout(nnx.state(loaded, nnx.Param), old)
    _check_same_shapes(old, new, where)
    nnx.update(target, jax.tree.map(lambda o, n: n.astype(o.dtype), old, new))


def _restore_into(target: nnx.Module, path: str, where: str) -> None:
    """An orbax params checkpoint into `target`: with its adapters when it has them."""
    from emollm_jax.checkpoint import restore_params

    try:
        new = restore_params(path, nnx.state(target, nnx.Param), None)
    except KeyError:
        if not lora.has_adapters(target):
            raise
        new = restore_params(path, nnx.state(target, _BASE), None)
        log.info("%s holds no LoRA adapters: they start fresh", where)
    nnx.update(target, new)


def _as_layout(new: Any, old: Any) -> Any:
    """`new` with its layer stacks in `old`'s layout (a checkpoint's unrolled layers into a model with
    `scan_layers`, or back); as it is when anything else differs (`_check_same_shapes` then names it)."""
    from emollm_jax.models import stack

    try:
        return stack.relayout_state(new, old)
    except (KeyError, ValueError):
        return new


_PARTS = ("vision", "projector", "llm", "audio", "audio_projector")


def _kind(config: EmoLLMConfig, part: str) -> str:
    """`<part>: <kind>` of a model config's part ("none" when it has none), for log lines."""
    block = getattr(config, part)
    return f"{part} {getattr(block, 'kind', 'none') if block is not None else 'none'}"


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


