"""Chat templates and answer-only masks, on the tiny word-level tokenizer and on HF-format BPE tokenizers;
every template character for character against LLaVA's conversation templates and the models' own
tokenizer chat templates."""

import itertools
import json
import random

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from data_pipeline import text

CORPUS = [
    text.VICUNA_SYSTEM,
    text.LLAMA2_SYSTEM,
    "You are a helpful assistant.",
    "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n",
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>",
    "What emotion does the face show? Options: anger, joy, sadness, fear.",
    "Is the caption sarcastic given the picture? Answer yes or no.",
    "The mouth curves up and the eyes are bright, so the answer is joy.",
    "USER: ASSISTANT: [INST] [/INST] <<SYS>>\n <</SYS>>\n\n system user assistant",
] * 3

CONV = [
    {"from": "human", "value": "<image>\nWhat emotion does the face show? Options: anger, joy, sadness."},
    {"from": "gpt", "value": "joy"},
    {"from": "human", "value": "Why? Is it <video> sarcastic?"},
    {"from": "gpt", "value": "The mouth curves up, so no."},
]
VISUAL = [3, 5]


def _squash(s: str) -> str:
    """Whitespace- and case-insensitive form: tokenizers differ in spaces and the tiny one lowercases."""
    return "".join(s.replace("▁", " ").split()).lower()


def _llava_prompt(name: str, system: str, turns, *, eot: str, bos: str = "", for_generation=False) -> str:
    """The prompt LLaVA builds, transcribed from `Conversation.get_prompt` (haotian-liu/LLaVA and LLaVA-NeXT
    `llava/conversation.py`) for each template's separator style, with `bos` in front (LLaVA's tokenizer adds
    it) and `eot` closing each answer (the template's end-of-turn, or the tokenizer's eos without one).
    llama3: LLaVA-NeXT's LLAMA_3 style applies Meta-Llama-3-Instruct's chat template, written out here."""
    messages = [m for turn in turns for m in turn]
    if for_generation:
        messages[-1] = None
    if name == "vicuna_v1":  # SeparatorStyle.TWO, roles (USER, ASSISTANT), sep " ", sep2 "</s>"
        seps, ret = [" ", eot], system + " "
        for i, message in enumerate(messages):
            role = ("USER", "ASSISTANT")[i % 2]
            ret += role + ": " + message + seps[i % 2] if message else role + ":"
        return bos + ret
    if name in ("llama2", "mistral_instruct"):  # SeparatorStyle.LLAMA_2, sep "<s>" (llama2) | "", sep2 "</s>"
        sep = bos if name == "llama2" else ""
        wrap_sys = lambda msg: f"<<SYS>>\n{msg}\n<</SYS>>\n\n" if len(msg) > 0 else msg
        ret = ""
        for i, message in enumerate(messages):
            if message:
                if i == 0:
                    message = wrap_sys(system) + message
                ret += sep + f"[INST] {message} [/INST]" if i % 2 == 0 else " " + message + " " + eot
        return bos + ret.removeprefix(sep)  # LLaVA: ret.lstrip(sep); the tokenizer then adds bos
    if name == "chatml":  # SeparatorStyle.CHATML, system "<|im_start|>system\n...", sep "<|im_end|>"
        ret = "" if system == "" else "<|im_start|>system\n" + system + "<|im_end|>" + "\n"
        for i, message in enumerate(messages):
            role = ("<|im_start|>user", "<|im_start|>assistant")[i % 2]
            ret += role + "\n" + message + (eot if i % 2 else "<|im_end|>") + "\n" if message else role + "\n"
        return bos + ret
    assert name == "llama3", name
    header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    ret = bos + header("system") + system.strip() + "<|eot_id|>"
    for role, message in zip(itertools.cycle(["user", "assistant"]), messages, strict=False):
        if message:
            ret += header(role) + message.strip() + (eot if role == "assistant" else "<|eot_id|>")
    return ret + (header("assistant") if for_generation else "")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return text.train_tiny_tokenizer(CORPUS + [m["value"] for m in CONV], tmp_path_factory.mktemp("tiny"))


def _save_hf(tok, directory, **special):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(directory)
    return text.load_tokenizer(directory)


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    """SentencePiece-style BPE (metaspace, prepend on first word), bos/eos, no <image> in vocab."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    )
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return _save_hf(tok, tmp_path_factory.mktemp("llama"), **special)


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """Byte-level BPE with ChatML specials and no bos (Qwen2-style), <image> as an added special token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return _save_hf(tok, tmp_path_factory.mktemp("qwen"), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    chat_template=QWEN2_CHAT_TEMPLATE)


# Meta-Llama-3-8B-Instruct's and Qwen2-Instruct's tokenizer_config.json chat_template, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory):
    """Byte-level BPE with LLaMA-3's special tokens and chat template; <image> as an added special token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<image>"]
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return _save_hf(tok, tmp_path_factory.mktemp("llama3"), bos_token="<|begin_of_text|>",
                    eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE)


TOKENIZERS = ["tiny", "llama_like", "qwen_like", "llama3_like"]
TEMPLATE_NAMES = list(text.TEMPLATES)
BYTE_LEVEL = ["qwen_like", "llama3_like"]  # decode(encode(s)) == s exactly: no whitespace squashing needed


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_mask_lines_up_with_answers(request, tok_name, template):
    tok = request.getfixturevalue(tok_name)
    ids, mask = text.encode_conversation(CONV, template, tok, visual_tokens=VISUAL)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    eot_id = text.end_of_turn_id(template, tok)
    eot = tok.decode([eot_id])
    answers = [m["value"] for m in CONV[1::2]]
    questions = [m["value"] for m in CONV[0::2]]

    # one supervised run per answer, each exactly "answer + end-of-turn" and ending on the end-of-turn id
    runs = _runs(mask)
    assert len(runs) == len(answers)
    for (s, e), answer in zip(runs, answers, strict=True):
        assert ids[e - 1] == eot_id
        assert _squash(tok.decode(ids[s:e])) == _squash(answer + eot)

    # visual tokens: the right count per marker, contiguous, never supervised
    img = ids == tok.image_token_id
    assert [e - s for s, e in _runs(img)] == VISUAL and not (img & mask).any()

    # unsupervised tokens hold the system prompt and every question (markers expanded) in order
    prompt = _squash(tok.decode(ids[~mask & ~img]))
    system = text.get_template(template).system
    assert prompt.find(_squash(system)) < prompt.find(_squash(questions[0].replace("<image>", "")))
    for q in questions:
        for chunk in q.replace("<video>", "<image>").split("<image>"):
            assert _squash(chunk) in prompt

    # the whole sequence reads as LLaVA's joined prompt string
    bos = tok.decode([tok.bos_id]) if tok.bos_id is not None else ""
    ref = _llava_prompt(template, system, list(zip(questions, answers, strict=True)), eot=eot, bos=bos)
    for marker, n in zip(["<image>", "<video>"], VISUAL, strict=True):
        ref = ref.replace(marker, tok.decode([tok.image_token_id] * n), 1)
    assert _squash(tok.decode(ids)) == _squash(ref)
    if tok_name in BYTE_LEVEL:  # they decode to exactly the text they encode: character for character
        assert tok.decode(ids) == ref


@pytest.mark.parametrize("tok_name", TOKENIZERS)
@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_generation_prompt_is_training_prefix(request, tok_name, template):
    tok = request.getfixturevalue(tok_name)
    ids, mask = text.encode_conversation(CONV, template, tok, visual_tokens=VISUAL)
    gen, gen_mask = text.encode_conversation(CONV, template, tok, visual_tokens=VISUAL, for_generation=True)
    last_answer_start = _runs(mask)[-1][0]
    np.testing.assert_array_equal(gen, ids[:last_answer_start])
    assert gen_mask.sum() == mask[:last_answer_start].sum()  # earlier answers stay; nothing after the prompt


def test_bos_and_prefix(tiny, llama_like, qwen_like):
    ids, _ = text.encode_conversation(CONV[:2], "vicuna_v1", llama_like, visual_tokens=[1])
    assert ids[0] == llama_like.bos_id and (ids == llama_like.bos_id).sum() == 1
    ids, _ = text.encode_conversation(CONV, "llama2", llama_like, visual_tokens=VISUAL)
    assert (ids == llama_like.bos_id).sum() == 2  # one <s> per [INST] turn
    assert qwen_like.bos_id is None and qwen_like.eos_id == qwen_like.token_to_id("<|im_end|>")
    ids, _ = text.encode_conversation(CONV[:2], "chatml", qwen_like, visual_tokens=[1])
    assert ids[0] == qwen_like.token_to_id("<|im_start|>")

    prefix = "The eyes are bright, so the answer is joy. "
    ids, mask = text.encode_conversation(CONV[:2], "vicuna_v1", tiny, visual_tokens=[2], prompt_prefix=prefix)
    decoded = _squash(tiny.decode(ids))
    assert decoded.index(_squash(prefix)) < decoded.index(_squash("<image>")) < decoded.index("whatemotion")
    assert _squash(prefix) not in _squash(tiny.decode(ids[mask]))


def test_image_token_added_when_missing(llama_like):
    assert llama_like.token_to_id("<image>") == llama_like.image_token_id
    assert llama_like.image_token_id == llama_like.vocab_size - 1  # appended, vocabulary grew by one
    assert llama_like.encode("a <image> b").count(llama_like.image_token_id) == 1


def test_tiny_tokenizer_contract_and_determinism(tmp_path, tiny):
    assert [tiny.token_to_id(t) for t in ("<pad>", "<unk>", "<s>", "</s>", "<image>")] == [0, 1, 2, 3, 4]
    assert (tiny.pad_id, tiny.bos_id, tiny.eos_id, tiny.image_token_id) == (0, 2, 3, 4)
    assert tiny.decode(tiny.encode("Joy, SADNESS?")) == "joy , sadness ?"
    texts = CORPUS + ["zeta alpha alpha beta"]
    a = text.train_tiny_tokenizer(texts, tmp_path / "a")
    shuffled = list(texts)
    random.Random(0).shuffle(shuffled)
    text.train_tiny_tokenizer(shuffled, tmp_path / "b")
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    vocab = json.loads((tmp_path / "a/tokenizer.json").read_text())["model"]["vocab"]
    assert vocab["alpha"] < vocab["zeta"] and "<image>" not in list(vocab)[5:]
    assert a.encode("never-seen-word")[0] == a.token_to_id("<unk>")


def test_raw_tokenizers_fallback_matches_transformers(tiny, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    raw = text.load_tokenizer(tiny.name)
    assert raw._is_hf is False and (raw.bos_id, raw.eos_id, raw.pad_id, raw.image_token_id) == (2, 3, 0, 4)
    a = text.encode_conversation(CONV, "vicuna_v1", raw, visual_tokens=VISUAL)
    b = text.encode_conversation(CONV, "vicuna_v1", tiny, visual_tokens=VISUAL)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_conversations_name_the_problem(tiny):
    with pytest.raises(ValueError, match=r"x\.jsonl:3: 1 media markers .* but 2 media items"):
        text.encode_conversation(CONV[:2], "vicuna_v1", tiny, visual_tokens=[1, 1], where="x.jsonl:3: ")
    with pytest.raises(ValueError, match=r"conversations\[1\]"):
        text.encode_conversation([CONV[0], CONV[0]], "vicuna_v1", tiny, visual_tokens=[1, 1])
    with pytest.raises(ValueError, match="no answer"):
        text.encode_conversation(CONV[:1], "vicuna_v1", tiny, visual_tokens=[1])
    with pytest.raises(ValueError, match="unknown chat template"):
        text.get_template("alpaca")


# Whitespace left as a record may have it: templates keep it exactly as LLaVA does (llama3 trims, as Meta's).
MESSY = [("<image>\n  What emotion does the face show?  ", " joy \n"), ("Why?\n", "The mouth curves up.  ")]


@pytest.mark.parametrize("for_generation", [False, True], ids=["train", "generate"])
@pytest.mark.parametrize("template", TEMPLATE_NAMES)
@pytest.mark.parametrize("system", ["default", "given"])
def test_template_text_is_llavas_prompt(template, system, for_generation):
    tmpl = text.get_template(template)
    system = tmpl.system if system == "default" else "Answer with one word."
    got = tmpl.text(system, MESSY, for_generation, bos="<s>")
    assert got == _llava_prompt(template, system, MESSY, eot=tmpl.end_of_turn, bos="<s>",
                                for_generation=for_generation)


@pytest.mark.parametrize("for_generation", [False, True], ids=["train", "generate"])
@pytest.mark.parametrize("template, tok_name", [("llama3", "llama3_like"), ("chatml", "qwen_like")])
def test_templates_are_the_tokenizers_own_chat_template(request, template, tok_name, for_generation):
    """LLaMA-3 and Qwen2 checkpoints ship their chat template in tokenizer_config.json: ours renders the same
    string, and the ids `encode_conversation` makes decode to exactly that string."""
    from transformers import AutoTokenizer

    tok = request.getfixturevalue(tok_name)
    hf = AutoTokenizer.from_pretrained(tok.name, local_files_only=True)
    tmpl = text.get_template(template)
    convs = [{"from": "human", "value": q} for q, _ in MESSY]
    for turn, (_, a) in zip(range(1, 4, 2), MESSY, strict=True):
        convs.insert(turn, {"from": "gpt", "value": a})
    messages = [{"role": "system", "content": tmpl.system}] + [
        {"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in convs]
    if for_generation:
        messages = messages[:-1]
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=for_generation)
    assert tmpl.text(tmpl.system, MESSY, for_generation, bos=hf.bos_token or "") == want
    ids, mask = text.encode_conversation(convs, template, tok, visual_tokens=[2],
                                         for_generation=for_generation)
    assert tok.decode(ids) == want.replace("<image>", "<image>" * 2)
    answers = [a.strip() if template == "llama3" else a for _, a in MESSY]  # Meta's template trims
    supervised = answers[:1] if for_generation else answers
    assert tok.decode(ids[mask]) == "".join(a + tmpl.end_of_turn for a in supervised)


def test_each_decoder_names_its_template():
    from emollm_jax.models import catalog  # noqa: F401  (registers the shipped decoders)
    from emollm_jax.models.parts import DECODERS

    want = {"llama": "vicuna_v1", "llama3": "llama3", "mistral": "mistral_instruct", "qwen2": "chatml"}
    assert {kind: DECODERS.get(kind).chat_template for kind in want} == want
    assert all(cls.chat_template in text.TEMPLATES for _, cls in DECODERS.items())
