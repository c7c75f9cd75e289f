"""Tokenizers, chat templates and answer-only loss masks.

A conversation is encoded piece by piece: every template is a list of pieces (prompt text, answer text, or a
special token by id), each tokenized on its own, so the loss mask is known per token by construction and never
recovered by re-tokenizing a joined string and guessing offsets (LLaVA's "tokenization mismatch" bug).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from data_pipeline import storage
from data_pipeline.records import AUDIO_MARKER, IMAGE_MARKER, VIDEO_MARKER

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
TINY_SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)  # ids 0..4 in every tiny tokenizer, whatever its texts
VISUAL_MARKERS = (IMAGE_MARKER, VIDEO_MARKER)
MEDIA_MARKERS = (*VISUAL_MARKERS, AUDIO_MARKER)
_MARKER_RE = re.compile("(" + "|".join(re.escape(m) for m in MEDIA_MARKERS) + ")")


class Tokenizer:
    """One interface over an HF tokenizer (`transformers`) or a raw `tokenizers.Tokenizer`.

    `encode` never adds special tokens: templates place bos/eos themselves. Picklable, so Grain workers can
    hold one.
    """

    def __init__(self, backend: Any, *, name: str, special: dict[str, str | None], image_token_id: int,
                 audio_token_id: int | None = None):
        self._backend = backend
        self._is_hf = not _is_raw_tokenizers(backend)
        self.name = name
        vocab = backend.get_vocab()
        self._vocab: dict[str, int] = dict(vocab)
        self.vocab_size: int = len(backend) if self._is_hf else backend.get_vocab_size(with_added_tokens=True)
        self.eos_id: int = self._required(special.get("eos"), "eos")
        self.bos_id: int | None = self.token_to_id(special["bos"]) if special.get("bos") else None
        pad = next((self.token_to_id(special[k]) for k in ("pad", "unk") if special.get(k)), None)
        self.pad_id: int = pad if pad is not None else self.eos_id
        self.image_token_id: int = image_token_id
        self.audio_token_id: int | None = audio_token_id  # None: this tokenizer's prompts carry no sound
        # True when "a b" tokenizes as encode("a") + encode("b") (word-level, SentencePiece-style metaspace):
        # such tokenizers re-create a separating space themselves, so pieces drop one leading space.
        self.space_joins_pieces: bool = self.encode("is it") == self.encode("is") + self.encode("it")

    def _required(self, token: str | None, what: str) -> int:
        tid = self.token_to_id(token) if token else None
        if tid is None:
            raise ValueError(f"tokenizer {self.name}: no {what} token (got {token!r})")
        return tid

    def token_to_id(self, token: str) -> int | None:
        """Id of an exact vocabulary entry (incl. added tokens), or None."""
        return self._vocab.get(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""
        if self._is_hf:
            return list(self._backend.encode(text, add_special_tokens=False))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, image_token_id={self.image_token_id})"


def _is_raw_tokenizers(backend: Any) -> bool:
    import tokenizers

    return isinstance(backend, tokenizers.Tokenizer)


def _token_str(tok: Any) -> str | None:
    """Special-token entries in tokenizer_config.json are a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_tokenizer(
    path: str | os.PathLike, *, image_token: str = IMAGE, image_token_id: int | None = None,
    audio_token_id: int | None = None,
) -> Tokenizer:
    """Loads a tokenizer directory (HF layout) or a `tokenizer.json` file.

    Uses `transformers.AutoTokenizer` when importable, else `tokenizers.Tokenizer.from_file` plus the special
    tokens named in `tokenizer_config.json`. The image token: `image_token` if the vocabulary has it, else the
    explicit `image_token_id` (e.g. an id the model reserves), else `image_token` is added as a special token
    (the vocabulary grows by one; the model's embedding must be sized to `vocab_size`). The audio token:
    `<audio>` if the vocabulary has it, else `audio_token_id` (a placeholder the model replaces before any
    embedding lookup, so it may lie outside the vocabulary), else None (no sound in prompts). A URL
    (`gs://...`) is read from a local copy (`storage.local_copy`).
    """
    if storage.is_remote(path) and not storage.path(path).exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    path = storage.local_copy(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None and os.path.isdir(path):
        backend = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        special = {k: getattr(backend, f"{k}_token", None) for k in ("bos", "eos", "pad", "unk")}
        if image_token not in backend.get_vocab() and image_token_id is None:
            backend.add_special_tokens({"additional_special_tokens": [image_token]})
    else:
        import tokenizers

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        backend = tokenizers.Tokenizer.from_file(file)
        config_file = os.path.join(directory, "tokenizer_config.json")
        config = {}
        if os.path.exists(config_file):
            with open(config_file) as f:
                config = json.load(f)
        special = {k: _token_str(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        if not config:  # bare tokenizer.json: the tiny tokenizer's conventions
            special = {"bos": BOS, "eos": EOS, "pad": PAD, "unk": UNK}
        if backend.token_to_id(image_token) is None and image_token_id is None:
            backend.add_special_tokens([tokenizers.AddedToken(image_token, special=True, normalized=False)])
    vocab = backend.get_vocab()
    image_id = vocab.get(image_token, image_token_id)
    audio_id = vocab.get(AUDIO_MARKER, audio_token_id)
    return Tokenizer(backend, name=path, special=special, image_token_id=int(image_id),
                     audio_token_id=None if audio_id is None else int(audio_id))


def _tiny_splitters() -> tuple[Any, Any]:
    """(normalizer, pre-tokenizer) of the tiny word-level tokenizer: lowercase; whitespace and punctuation."""
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.Lowercase(), pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                             pre_tokenizers.Punctuation()])


def _tiny_words(text: str, normalizer: Any, pre_tokenizer: Any) -> list[str]:
    words = []
    for piece in _MARKER_RE.split(text):  # markers are special tokens, never vocabulary words
        if piece in MEDIA_MARKERS or not piece:
            continue
        words += [w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(piece))]
    return words


def tiny_token_count(text: str) -> int:
    """Tokens the tiny tokenizer makes of `text` whatever its vocabulary (an unknown word is one `<unk>`),
    media markers excluded: what a record's text costs before the tokenizer exists."""
    return len(_tiny_words(text, *_tiny_splitters()))


def train_tiny_tokenizer(
    texts: Iterable[str], path: str | os.PathLike, *, min_frequency: int = 1
) -> Tokenizer:
    """Trains the tiny variant's word-level tokenizer into `path/tokenizer.json` (+ tokenizer_config.json).

    Lowercased, split on whitespace and punctuation. Ids 0..4 are `<pad> <unk> <s> </s> <image>`; then words
    by descending count, ties alphabetical, so the same texts always give the same file.
    """
    import tokenizers
    from tokenizers.models import WordLevel

    normalizer, pre_tokenizer = _tiny_splitters()
    counts: collections.Counter[str] = collections.Counter()
    for text in texts:
        counts.update(_tiny_words(text, normalizer, pre_tokenizer))
    for tok in TINY_SPECIAL_TOKENS:
        counts.pop(tok, None)
    words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({w: i + len(TINY_SPECIAL_TOKENS) for i, w in enumerate(words)})
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    specials = (*TINY_SPECIAL_TOKENS, VIDEO_MARKER)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    tok.decoder = None
    path = os.fspath(path)
    storage.path(path).mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "additional_special_tokens": [IMAGE],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 30,
    }
    storage.write_text(storage.join(path, "tokenizer.json"), tok.to_str(pretty=True))
    config_text = json.dumps(config, indent=2, sort_keys=True)
    storage.write_text(storage.join(path, "tokenizer_config.json"), config_text)
    return load_tokenizer(path)


# ----------------------------------------------------------------------------------------------------------
# Chat templates


@dataclasses.dataclass(frozen=True)
class Piece:
    """A run of the encoded conversation. `text` is tokenized; `token` ("bos" | "eos" | "eot") is one id."""

    text: str = ""
    token: str | None = None
    supervised: bool = False


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format in LLaVA's terms.

    `render(system, turns, for_generation)` gives the pieces; turns are (question, answer | None) pairs.
    `end_of_turn` names the token closing an answer ("</s>", "<|im_end|>", "<|eot_id|>"); it is supervised.
    `text(...)` joins the pieces into the prompt string (LLaVA's `Conversation.get_prompt`, bos included).
    """

    name: str
    system: str
    end_of_turn: str = EOS

    def render(
        self, system: str, turns: Sequence[tuple[str, str | None]], for_generation: bool
    ) -> list[Piece]:
        raise NotImplementedError

    def text(self, system: str, turns: Sequence[tuple[str, str | None]], for_generation: bool = False,
             *, bos: str = BOS) -> str:
        """The pieces joined into one string, special tokens written as text (`bos`; "" for a tokenizer
        without one): character for character what the model reads. for_generation drops the last answer."""
        special = {"bos": bos, "eos": EOS, "eot": self.end_of_turn}
        turns = list(turns)
        if for_generation:
            turns[-1] = (turns[-1][0], None)
        pieces = self.render(system, turns, for_generation)
        return "".join(special[p.token] if p.token else p.text for p in pieces)


class _Vicuna(ChatTemplate):
    def render(self, system, turns, for_generation):
        # LLaVA conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>"):
        # "{sys} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"
        pieces = [Piece(token="bos")]
        for i, (q, a) in enumerate(turns):
            head = f"{system} USER: " if i == 0 else "USER: "
            pieces.append(Piece(f"{head}{q} ASSISTANT:"))
            if a is None:
                break
            pieces += [Piece(f" {a}", supervised=True), Piece(token="eot", supervised=True)]
        return pieces


@dataclasses.dataclass(frozen=True)
class _Llama2(ChatTemplate):
    bos_each_turn: bool = True

    def render(self, system, turns, for_generation):
        # LLaVA SeparatorStyle.LLAMA_2: "[INST] {q} [/INST]" per question, " {a} </s>" per answer, the system
        # text (if any) wrapped in <<SYS>> inside the first question; conv_llava_llama_2 (sep "<s>") opens
        # every turn with <s>, conv_mistral_instruct (sep "") only the first (the tokenizer's bos):
        # "<s>[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] {q2} [/INST] {a2} </s>"
        pieces = []
        for i, (q, a) in enumerate(turns):
            if i == 0 and system:
                q = f"<<SYS>>\n{system}\n<</SYS>>\n\n{q}"
            if i == 0 or self.bos_each_turn:
                pieces.append(Piece(token="bos"))
            pieces.append(Piece(f"[INST] {q} [/INST]"))
            if a is None:
                break
            pieces += [Piece(f" {a} ", supervised=True), Piece(token="eot", supervised=True)]
        return pieces


class _Llama3(ChatTemplate):
    def render(self, system, turns, for_generation):
        # Meta-Llama-3-Instruct's chat_template, which LLaVA-NeXT's conv_llava_llama_3 applies (contents
        # trimmed): "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{sys}<|eot_id|>"
        # "<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
        # "<|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>" per turn
        header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
        head = header("system") + system.strip() + self.end_of_turn
        pieces = [Piece(token="bos")]
        for q, a in turns:
            pieces.append(Piece(f"{head}{header('user')}{q.strip()}{self.end_of_turn}{header('assistant')}"))
            head = ""
            if a is None:
                break
            pieces += [Piece(a.strip(), supervised=True), Piece(token="eot", supervised=True)]
        return pieces


class _ChatML(ChatTemplate):
    def render(self, system, turns, for_generation):
        # LLaVA conv_qwen (SeparatorStyle.CHATML) and Qwen2's own chat_template:
        # "<|im_start|>system\n{sys}<|im_end|>\n"
        # "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" per turn
        pieces = [Piece(token="bos")]
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        for q, a in turns:
            pieces.append(Piece(f"{head}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"))
            head = ""
            if a is None:
                break
            pieces += [Piece(a, supervised=True), Piece(token="eot", supervised=True), Piece("\n")]
        return pieces


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA2_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
# Named as in this project's configs; LLaVA's own names in the comments.
TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": _Vicuna("vicuna_v1", VICUNA_SYSTEM),  # vicuna_v1 (LLaVA-1.5)
    "llama2": _Llama2("llama2", LLAMA2_SYSTEM),  # llava_llama_2
    "mistral_instruct": _Llama2("mistral_instruct", "", bos_each_turn=False),  # mistral_instruct (LLaVA-1.6)
    "llama3": _Llama3("llama3", LLAMA2_SYSTEM, end_of_turn="<|eot_id|>"),  # llava_llama_3 (LLaVA-NeXT)
    "chatml": _ChatML("chatml", "You are a helpful assistant.", end_of_turn="<|im_end|>"),  # qwen
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    if isinstance(name, ChatTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def end_of_turn_id(template: str | ChatTemplate, tokenizer: Tokenizer) -> int:
    """The id that closes an answer (generation stops on it): the template's marker if in vocab, else eos."""
    tid = tokenizer.token_to_id(get_template(template).end_of_turn)
    return tid if tid is not None else tokenizer.eos_id


_HUMAN, _GPT = ("human", "user"), ("gpt", "assistant")


def _turns(convs: Sequence[dict], where: str) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system override, [(question, answer)]) from LLaVA `conversations`, checking alternation."""
    system = None
    convs = list(convs)
    if convs and convs[0].get("from") == "system":
        system = convs.pop(0)["value"]
    turns: list[tuple[str, str | None]] = []
    for i, msg in enumerate(convs):
        role, value = msg.get("from"), msg.get("value")
        expected = _HUMAN if i % 2 == 0 else _GPT
        if role not in expected or not isinstance(value, str):
            raise ValueError(
                f"{where}conversations[{i}]: expected 'from' in {expected} and a string 'value', got {msg!r}"
            )
        if i % 2 == 0:
            turns.append((value, None))
        else:
            turns[-1] = (turns[-1][0], value)
    if not turns:
        raise ValueError(f"{where}conversations is empty")
    return system, turns


def encode_conversation(
    record_convs: Sequence[dict],
    template: str | ChatTemplate,
    tokenizer: Tokenizer,
    *,
    visual_tokens: Sequence[int],
    audio_tokens: Sequence[int] = (),
    prompt_prefix: str = "",
    for_generation: bool = False,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a LLaVA-style conversation with an answer-only loss mask.

    Args:
      record_convs: `[{"from": "human"|"gpt", "value": str}, ...]` (optionally a leading "system" message).
      visual_tokens: for the i-th `<image>`/`<video>` marker (in text order), how many `image_token_id`s
        replace it: `visual_tokens_per_media(cfg, num_frames)` of that media item.
      audio_tokens: for the i-th `<audio>` marker, how many `audio_token_id`s replace it:
        `audio_tokens_per_item(cfg, num_windows)` of that sound.
      prompt_prefix: text (e.g. EmoPrompt exemplars) put before the first human message.
      for_generation: stop after the prompt of the last human turn (answers of earlier turns kept, the last
        answer dropped), ready for the model to continue.
      where: context for error messages, e.g. "train.jsonl:12 (id emo_c-1): ".

    Returns:
      `input_ids int32[T]` and `loss_mask bool[T]`, True on tokens of assistant answers and their
      end-of-turn token. Example (vicuna_v1, 2 visual tokens):
        `<s> sys USER : <im> <im> q ASSISTANT : joy </s>` -> mask `0 0 0 0 0 0 0 0 0 1 1`.
    """
    tmpl = get_template(template)
    system, turns = _turns(record_convs, where)
    if for_generation:
        turns[-1] = (turns[-1][0], None)
    elif turns[-1][1] is None:
        raise ValueError(f"{where}the last human turn has no answer; nothing to supervise")
    if prompt_prefix:
        turns[0] = (prompt_prefix + turns[0][0], turns[0][1])
    pieces = tmpl.render(tmpl.system if system is None else system, turns, for_generation)

    markers = [m for p in pieces for m in _MARKER_RE.findall(p.text)]
    n_visual, n_audio = sum(m in VISUAL_MARKERS for m in markers), markers.count(AUDIO_MARKER)
    if n_visual != len(visual_tokens):
        raise ValueError(f"{where}{n_visual} media markers in the text but {len(visual_tokens)} media items")
    if n_audio != len(audio_tokens):
        raise ValueError(f"{where}{n_audio} {AUDIO_MARKER} markers in the text but {len(audio_tokens)} "
                         "sounds")
    if n_audio and tokenizer.audio_token_id is None:
        raise ValueError(f"{where}an {AUDIO_MARKER} marker, but the tokenizer has no audio token id (a model "
                         "without an audio tower reads no sound)")
    special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "eot": end_of_turn_id(tmpl, tokenizer)}
    ids: list[int] = []
    mask: list[bool] = []
    media, sounds = iter(visual_tokens), iter(audio_tokens)
    for piece in pieces:
        if piece.token is not None:
            if special[piece.token] is None:
                continue  # e.g. no bos in a Qwen-style tokenizer
            ids.append(special[piece.token])
            mask.append(piece.supervised)
            continue
        for part in _MARKER_RE.split(piece.text):
            if part in MEDIA_MARKERS:
                if piece.supervised:
                    raise ValueError(f"{where}a {part} marker in an answer; media belong in questions")
                if part == AUDIO_MARKER:
                    part_ids = [tokenizer.audio_token_id] * int(next(sounds))
                else:
                    part_ids = [tokenizer.image_token_id] * int(next(media))
            else:
                part_ids = _encode_piece(tokenizer, part) if part else []
            ids += part_ids
            mask += [piece.supervised] * len(part_ids)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _encode_piece(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokenizes one piece. Tokenizers that insert a word-separating space themselves (word-level,
    SentencePiece metaspace) get the piece without its leading space, so " joy" is "▁joy", not "▁ ▁joy"."""
    if tokenizer.space_joins_pieces and text.startswith(" "):
        text = text[1:]
    if not text.strip(" "):
        return [] if tokenizer.space_joins_pieces or not text else tokenizer.encode(text)
    return tokenizer.encode(text)
