"""Tokenizer parity: our wrapper against sentencepiece, tokenizers and transformers on the same files.

Every tokenizer here is trained inside the test on a generated corpus (no hub downloads). The
expected values always come from the independent libraries, never from our own code: ids from
`SentencePieceProcessor` / `tokenizers.Tokenizer`, chat prompts from transformers'
`apply_chat_template` on the same directory.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from jreason.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    load_tokenizer,
    split_thinking,
    train_sentencepiece,
)

REPO = Path(__file__).resolve().parents[1]

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "reasoning",
    "think",
    "step",
    "first",
    "then",
    "so",
    "because",
    "total",
    "apples",
    "cost",
    "each",
    "question",
    "solve",
    "equation",
    "x",
    "y",
    "sum",
    "product",
    "is",
    "are",
    "was",
    "were",
    "12",
    "345",
    "6789",
    "+",
    "-",
    "*",
    "/",
    "=",
    "?",
    "!",
    ",",
    ".",
]

TEXTS = [
    "the model thinks step by step",
    "  leading spaces, double  spaces and trailing ",
    "line one\nline two\n\n\ttabbed\r\n",
    "x = 12 * 345 + 6789?",
    "unicode: café naïve 東京 😀 — ∑",
    "<think>\nfirst, 3 + 4 = 7\n</think>\nThe answer is 7.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
]

# Qwen3's chat template with the tool-call branches cut: it reads `reasoning_content`, strips
# thinking from turns before the last user query, honours `enable_thinking`, and uses
# `namespace`, reverse slicing and string methods, so it exercises the Jinja environment.
QWEN3_TEMPLATE = """\
{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role != "system" %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# Llama-2-style, written with plain (undashed) block tags so the output depends on trim_blocks and
# lstrip_blocks; also uses bos/eos variables, tojson, loop controls and the {% generation %} tag.
LLAMA_TEMPLATE = """\
{{ bos_token }}
{% if tools %}
[TOOLS] {{ tools | tojson }} [/TOOLS]
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
[INST] {{ message['content'] | trim }} [/INST]
    {% else %}
        {% generation %}
 {{ message['content'] | trim }} {{ eos_token }}
        {% endgeneration %}
    {% endif %}
{% endfor %}
"""

CONVERSATIONS = {
    "system_user": [
        {"role": "system", "content": "You are a careful solver."},
        {"role": "user", "content": "What is 3 + 4?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "<think>\n4 * 3 = 12\n</think>\n\n12"},
        {"role": "user", "content": "and minus 1?"},
    ],
    "last_assistant_reasoning_alias": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7", "reasoning": "7 has no divisors but 1 and 7."},
    ],
    "none_fields_dropped": [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": "hello", "tool_calls": None, "reasoning_content": None},
    ],
}


def corpus(n=3000, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(n)]


# --- sentencepiece --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(corpus(), 512, tmp_path_factory.mktemp("sp") / "tokenizer")


def test_sentencepiece_matches_library(sp_model):
    ours = load_tokenizer(sp_model)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert ours.vocab_size == ref.get_piece_size()
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_id(), ref.eos_id(), ref.pad_id())
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, out_type=int)
        assert ours.encode(text, add_bos=True, add_eos=True) == ref.encode(
            text, out_type=int, add_bos=True, add_eos=True
        )
        assert ours.decode(ids) == ref.decode(ids) == text  # byte fallback: everything round-trips
    for i in range(ours.vocab_size):
        piece = ref.id_to_piece(i)
        assert ours.id_to_token(i) == piece
        assert ours.token_to_id(piece) == ref.piece_to_id(piece)
    assert ours.token_to_id("definitely-not-a-piece") is None  # sentencepiece would say unk_id


def test_sentencepiece_special_and_think_tokens(sp_model):
    ours = load_tokenizer(sp_model.parent)  # directory form needs tokenizer.model
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    for tag, tid in (("<think>", ours.think_open_id), ("</think>", ours.think_close_id)):
        assert tid is not None and ref.encode(tag, out_type=str) == [tag]
        assert ref.id_to_piece(tid) == tag
        assert tid not in ours.special_ids  # shown to the reader, so never skipped
    im_start, im_end = ref.piece_to_id("<|im_start|>"), ref.piece_to_id("<|im_end|>")
    controls = {i for i in range(ref.get_piece_size()) if ref.is_control(i) or ref.is_unknown(i)}
    assert ours.special_ids == controls | {im_start, im_end}
    assert ours.stop_ids == {ref.eos_id(), im_end}
    text = "<think>\nok\n</think>\nyes"
    ids = [ref.bos_id(), *ref.encode(text), im_end, ref.eos_id()]
    assert ours.decode(ids, skip_special_tokens=True) == text


def test_train_tokenizer_cli(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(corpus(500)) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "tokenizer"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/train_tokenizer.py"),
            "--input",
            str(tmp_path / "corpus.txt"),
        ]
        + ["--vocab-size", "400", "--out-prefix", str(out)],
        check=True,
        capture_output=True,
    )
    ref = spm.SentencePieceProcessor(model_file=str(out) + ".model")
    assert ref.decode(ref.encode("think 😀\n")) == "think 😀\n"
    assert ref.encode("<|im_start|>", out_type=str) == ["<|im_start|>"]


# --- Hugging Face tokenizer.json ------------------------------------------------------------


def qwen_like_dir(path: Path) -> Path:
    """A byte-level BPE with ChatML specials and non-special think tags, as Qwen3 ships it."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
    )
    return save_hf_dir(
        path,
        tok,
        chat_template=QWEN3_TEMPLATE,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos_token=False,
    )


def llama_like_dir(path: Path) -> Path:
    """A metaspace BPE whose post-processor adds <s>, with no add_bos_token in the config."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return save_hf_dir(
        path,
        tok,
        chat_template=LLAMA_TEMPLATE,
        bos_token={"content": "<s>", "special": True, "__type": "AddedToken"},
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_hf_dir(path: Path, tok, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen_like_dir(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module", params=["qwen", "llama"])
def hf_dir(request, tmp_path_factory):
    make = {"qwen": qwen_like_dir, "llama": llama_like_dir}[request.param]
    return make(tmp_path_factory.mktemp(request.param))


def test_hf_encode_decode_matches_libraries(hf_dir):
    ours = load_tokenizer(hf_dir)
    ref = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    assert ours.vocab_size == len(auto)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        auto.bos_token_id,
        auto.eos_token_id,
        auto.pad_token_id,
    )
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ids == auto.encode(text, add_special_tokens=False)
        assert ids == fast.encode(text, add_special_tokens=False)
        # add_bos_token (from the config or the post-processor) reproduces transformers' default.
        assert ours.encode(text, add_bos=ours.add_bos_token) == auto.encode(text)
        with_specials = [*ids, *sorted(ours.special_ids)]
        for skip in (False, True):
            expected = ref.decode(with_specials, skip_special_tokens=skip)
            assert ours.decode(with_specials, skip_special_tokens=skip) == expected
            assert expected == auto.decode(with_specials, skip_special_tokens=skip)
    for i in range(ours.vocab_size):
        token = ref.id_to_token(i)
        assert ours.id_to_token(i) == token and ours.token_to_id(token) == i
    assert set(auto.all_special_ids) <= ours.special_ids


def test_hf_think_tags(tmp_path):
    ours = load_tokenizer(qwen_like_dir(tmp_path) / "tokenizer.json")  # file form reads the config
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.think_open_id == ref.token_to_id("<think>")
    assert ours.think_close_id == ref.token_to_id("</think>")
    assert ref.encode("<think></think>", add_special_tokens=False).ids == [
        ours.think_open_id,
        ours.think_close_id,
    ]
    assert ours.think_open_id not in ours.special_ids
    assert ours.stop_ids == {ref.token_to_id("<|im_end|>")}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_matches_transformers(qwen_dir, name, add_generation_prompt, enable_thinking):
    ours = load_tokenizer(qwen_dir)
    auto = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    messages = CONVERSATIONS[name]
    kw = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
    expected = auto.apply_chat_template(messages, tokenize=False, **kw)
    assert ours.apply_chat_template(messages, **kw) == expected
    expected_ids = auto.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert ours.apply_chat_template(messages, tokenize=True, **kw) == expected_ids


def test_chat_template_bos_eos_variables_and_errors(tmp_path):
    path = llama_like_dir(tmp_path)
    ours = load_tokenizer(path)
    auto = transformers.AutoTokenizer.from_pretrained(path)
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": " 4 "},
        {"role": "user", "content": "and 3 + 3?"},
    ]
    # tojson must not HTML-escape, unlike Jinja's built-in filter.
    tools = [{"name": "calc", "description": "a < b & c > d", "parameters": {"x": "ünï"}}]
    for tokenize in (False, True):
        kw = dict(add_generation_prompt=False, tokenize=tokenize, tools=tools)
        expected = auto.apply_chat_template(messages, return_dict=False, **kw)
        assert ours.apply_chat_template(messages, **kw) == expected
    bad = [messages[0], messages[0]]
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        auto.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        ours.apply_chat_template(bad)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_default_template_matches_transformers(tmp_path, sp_model, name, enable_thinking):
    """Without a chat_template, both backends render DEFAULT_CHAT_TEMPLATE as transformers would."""
    path = qwen_like_dir(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    auto = transformers.AutoTokenizer.from_pretrained(path)
    messages = CONVERSATIONS[name]
    for backend in (load_tokenizer(path), load_tokenizer(sp_model)):
        for gen in (True, False):
            kw = dict(add_generation_prompt=gen, enable_thinking=enable_thinking)
            expected = auto.apply_chat_template(
                messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, **kw
            )
            assert backend.apply_chat_template(messages, **kw) == expected
            assert backend.apply_chat_template(messages, tokenize=True, **kw) == backend.encode(
                expected
            )


def test_sentencepiece_dir_with_config_template(tmp_path, sp_model):
    """A tokenizer.model directory picks up chat_template and special tokens from its config."""
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    config = {"chat_template": LLAMA_TEMPLATE, "bos_token": "<s>", "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(tmp_path)
    ref = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert ours.eos_id == ref.piece_to_id("<|im_end|>")
    messages = CONVERSATIONS["none_fields_dropped"]
    hf = transformers.AutoTokenizer.from_pretrained(qwen_like_dir(tmp_path / "hf"))
    expected = hf.apply_chat_template(
        messages,
        chat_template=LLAMA_TEMPLATE,
        tokenize=False,
        bos_token="<s>",
        eos_token="<|im_end|>",
    )
    assert ours.apply_chat_template(messages, add_generation_prompt=False) == expected


# --- the thinking split ---------------------------------------------------------------------


def test_default_template_round_trips_through_split_thinking(sp_model):
    tok = load_tokenizer(sp_model)
    question = [{"role": "user", "content": "2 + 2?"}]
    prompt = tok.apply_chat_template(question)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    answer = {"role": "assistant", "content": "It is 4.", "reasoning": "2 + 2 = 4"}
    full = tok.apply_chat_template([*question, answer], add_generation_prompt=False)
    completion = full[len(prompt) :].removesuffix("<|im_end|>\n")
    assert split_thinking(completion) == ("2 + 2 = 4", "It is 4.")
    no_think = tok.apply_chat_template(question, enable_thinking=False)
    assert split_thinking(no_think[len(prompt) - len("<think>\n") :] + "4") == ("", "4")


@pytest.mark.parametrize(
    "text, started, expected",
    [
        ("a\n</think>\n\nb", False, ("a", "b")),  # prompt ended in <think>
        ("<think>\na\n</think>\nb", False, ("a", "b")),
        ("  <think>a</think>b</think>c", False, ("a", "b</think>c")),  # first close wins
        ("just an answer", False, ("", "just an answer")),
        ("cut off mid-thought", True, ("cut off mid-thought", "")),
        ("<think>\ncut off", False, ("cut off", "")),
        ("</think>answer", True, ("", "answer")),
    ],
)
def test_split_thinking(text, started, expected):
    assert split_thinking(text, started_thinking=started) == expected


# --- errors ---------------------------------------------------------------------------------


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="vocab.txt"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_config_token_not_in_vocab(tmp_path, sp_model):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot|>"}))
    with pytest.raises(ValueError, match="eos_token.*<\\|eot\\|>"):
        load_tokenizer(tmp_path)
