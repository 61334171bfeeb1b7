r"""One `Tokenizer` interface over sentencepiece `.model` files and Hugging Face `tokenizer.json`.

Both backends are thin: ids come from the `sentencepiece` / `tokenizers` libraries unchanged, so a
model trained elsewhere sees exactly the ids it was trained on. What this file adds is the part
those libraries do not have: special-token bookkeeping from `tokenizer_config.json`, chat
templates, and the `<think>` / `</think>` split that reasoning models need.

`load_tokenizer(path)` takes a `.model` file, a `tokenizer.json` file, or a directory holding one
of them (`tokenizer.json` wins when both are there, as in transformers). A `tokenizer_config.json`
beside it may set `bos_token`, `eos_token`, `pad_token`, `unk_token`, `add_bos_token` and a Jinja
`chat_template`; its tokens override what the model file says.

Chat templates. A `chat_template` from the config is rendered the way transformers'
`apply_chat_template` renders it (sandboxed Jinja with trim_blocks/lstrip_blocks, `raise_exception`,
`tojson`, `strftime_now`, the special tokens as variables, `add_generation_prompt`,
`enable_thinking`), so prompts match the ones the model was fine-tuned on. Without one, the
built-in `DEFAULT_CHAT_TEMPLATE` is ChatML with R1-style thinking:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{content}<|im_end|>\n

An assistant message's thinking goes in `reasoning` (`reasoning_content` and `thinking` are
accepted too, as in transformers); without it the `<think>` block is left out. With
`add_generation_prompt` the prompt ends in `<|im_start|>assistant\n<think>\n` so the model starts
thinking, or, with `enable_thinking=False`, in an empty block `<think>\n\n</think>\n` so it
answers directly (the Qwen3 convention). `split_thinking` undoes this on a completion.

Deliberately left out: batched encoding, padding and truncation (the data pipeline owns shapes),
transformers' `clean_up_tokenization_spaces` (decode is the backend's own decode), and, for the
sentencepiece backend, parsing control tokens such as `<s>` out of text: sentencepiece never does,
so chat markup must be `user_defined_symbols` (as `train_sentencepiece` makes it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' and message['reasoning_content'] is defined %}"
    "<think>\n{{ message['reasoning_content'] }}\n</think>\n"
    "{% endif %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n"
    "{% else %}<think>\n{% endif %}"
    "{% endif %}"
)

# transformers copies a message's thinking under all three names, so templates written for any of
# them (Qwen3 reads `reasoning_content`, gpt-oss reads `thinking`) see it.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """The interface both backends implement; chat templates and special-token lookup live here.

    A backend implements `_encode`, `decode`, `token_to_id`, `id_to_token`, sets the ids it knows
    and `special_ids`, then calls `_setup`; everything else is defined once here so the two
    backends cannot drift apart in behaviour they share. Attributes are read-only after loading.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    # Whether the model expects BOS before plain text; encode() still only adds it when asked.
    add_bos_token: bool
    chat_template: str
    think_open: str = THINK_OPEN
    think_close: str = THINK_CLOSE
    think_open_id: int | None
    think_close_id: int | None
    special_ids: frozenset[int]  # control/special tokens: what skip_special_tokens drops
    stop_ids: frozenset[int]  # tokens that end an assistant turn: eos, and <|im_end|> if present

    def _setup(self, config: dict[str, Any], default_add_bos: bool) -> None:
        """Applies tokenizer_config.json on top of what the backend's own file says."""
        for name in ("bos", "eos", "pad", "unk"):
            token = _token_content(config.get(f"{name}_token"))
            if token is not None:
                tid = self.token_to_id(token)
                if tid is None:
                    raise ValueError(
                        f"tokenizer_config.json: {name}_token {token!r} is not in the vocab"
                    )
                setattr(self, f"{name}_id", tid)
        # Tokens the config names are special even if the model file does not mark them.
        named = {self.bos_id, self.eos_id, self.pad_id, self.unk_id} - {None}
        self.special_ids = frozenset(self.special_ids | named)
        self.add_bos_token = bool(config.get("add_bos_token", default_add_bos))
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...] form
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.chat_template = template or DEFAULT_CHAT_TEMPLATE
        # A think tag is only useful as an id if plain text encodes to exactly that one token;
        # otherwise stop/split logic must work on decoded text.
        self.think_open_id = self._single_token(THINK_OPEN)
        self.think_close_id = self._single_token(THINK_CLOSE)
        # Chat models end a turn with <|im_end|> (ChatML) even where eos_token is something else.
        stops = {self.eos_id, self._single_token(IM_END)} - {None}
        self.stop_ids = frozenset(stops)

    def _single_token(self, text: str) -> int | None:
        ids = self.encode(text)
        return ids[0] if len(ids) == 1 else None

    # --- implemented by the backends -------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._encode(text)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos token")
            ids = [self.bos_id, *ids]
        if add_eos:
            if self.eos_id is None:
                raise ValueError("add_eos=True but this tokenizer has no eos token")
            ids = [*ids, self.eos_id]
        return ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders `messages` like transformers' apply_chat_template on the same files.

        `template_kwargs` (e.g. `tools=[...]`) reach the template as variables. With
        `tokenize=True` the string is encoded without an added BOS: templates that want one write
        `{{ bos_token }}` themselves, as transformers assumes.
        """
        if not messages:
            raise ValueError("apply_chat_template needs at least one message")
        variables = {
            f"{name}_token": self.id_to_token(tid)
            for name in ("bos", "eos", "unk", "pad")
            if (tid := getattr(self, f"{name}_id")) is not None
        }
        text = _compile(self.chat_template).render(
            messages=[_normalize_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **{"tools": None, "documents": None, **variables, **template_kwargs},
        )
        return self.encode(text) if tokenize else text

    def __len__(self) -> int:
        return self.vocab_size


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file, through `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, model_file: str | Path, config: dict[str, Any] | None = None):
        import sentencepiece as spm

        self.path = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self._sp.get_piece_size()
        # sentencepiece reports a disabled special token as -1.
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            i if i >= 0 else None
            for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id(), self._sp.unk_id())
        )
        self.special_ids = _sentencepiece_special_ids(self._sp)
        self._setup(config or {}, default_add_bos=False)

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        # piece_to_id answers unk_id for unknown pieces; only an exact round trip is a real hit.
        i = self._sp.piece_to_id(token)
        return i if self._sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def _sentencepiece_special_ids(sp) -> frozenset[int]:
    """Control, unknown and user-defined pieces, except the think tags.

    User-defined pieces (chat markup such as `<|im_end|>`) count as special, like transformers'
    special added tokens. The think tags are kept out because they are part of what a reasoning
    model shows (Qwen3 marks `<think>` as a non-special added token for the same reason). The
    processor API cannot tell user-defined from normal pieces, hence the model proto.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    special = {kinds.CONTROL, kinds.UNKNOWN, kinds.USER_DEFINED}
    return frozenset(
        i
        for i, p in enumerate(proto.pieces)
        if p.type in special and p.piece not in (THINK_OPEN, THINK_CLOSE)
    )


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, through `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer_file: str | Path, config: dict[str, Any] | None = None):
        import tokenizers

        self.path = Path(tokenizer_file)
        self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        # Added tokens (chat markup) have ids past the base vocab; count them so every id fits.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        # tokenizer.json has no notion of "the" bos/eos; only tokenizer_config.json names them.
        self.bos_id = self.eos_id = self.pad_id = self.unk_id = None
        added = self._tok.get_added_tokens_decoder().items()
        self.special_ids = frozenset(i for i, t in added if t.special)
        self._setup(config or {}, default_add_bos=False)
        if "add_bos_token" not in (config or {}) and self.bos_id is not None:
            # Llama-3-style files say it in the post-processor instead of the config.
            self.add_bos_token = self._tok.encode("", add_special_tokens=True).ids[:1] == [
                self.bos_id
            ]

    def _encode(self, text: str) -> list[int]:
        # No post-processor: BOS/EOS are explicit arguments of encode(), never implied.
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(int(i))
        if token is None:
            raise IndexError(f"token id {i} is out of range (vocab size {self.vocab_size})")
        return token


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a `.model` file, a `tokenizer.json`, or a directory holding either."""
    path = Path(path)
    expected = "a sentencepiece .model file, a tokenizer.json, or a directory containing one"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer path {path} does not exist; expected {expected}")
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(
            f"no tokenizer.json or tokenizer.model in directory {path}; expected {expected}"
        )
    config = _read_config(path.parent / "tokenizer_config.json")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path, config)
    if path.suffix == ".json":
        return HFTokenizer(path, config)
    raise ValueError(f"unrecognised tokenizer file {path}; expected {expected}")


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(token: Any) -> str | None:
    # transformers saves special tokens either as plain strings or as serialized AddedTokens.
    if isinstance(token, dict):
        return token.get("content")
    return token


def split_thinking(text: str, started_thinking: bool = False) -> tuple[str, str]:
    """Splits a completion into (reasoning, answer) at the first `</think>`, R1 style.

    The opening `<think>` is optional because R1-style prompts (and DEFAULT_CHAT_TEMPLATE) already
    end in it, so the completion only contains the close. With no `</think>`, the text is all
    reasoning if it opened a think block or `started_thinking` says the prompt did (a completion
    cut off mid-thought), else all answer. Whitespace around the tags is dropped.
    """
    head, sep, tail = text.partition(THINK_CLOSE)
    stripped = head.lstrip()
    opened = stripped.startswith(THINK_OPEN)
    if opened:
        head = stripped[len(THINK_OPEN) :]
    if sep:
        return head.strip(), tail.lstrip()
    if opened or started_thinking:
        return head.strip(), ""
    return "", text


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    """Mirrors transformers: drop None-valued keys, then alias the reasoning fields."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


@cache
def _compile(template: str):
    """The Jinja environment transformers builds in `_cached_compile_jinja_template`.

    The `{% generation %}` tag (which transformers uses for assistant masks) renders its body
    unchanged here; transformers' extra hardening of `namespace`/`dict` is left to the sandbox.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def train_sentencepiece(
    lines_or_path: str | os.PathLike | Iterable[str],
    vocab_size: int,
    out_prefix: str | os.PathLike,
    *,
    split_digits: bool = True,
) -> Path:
    """Trains a small byte-fallback BPE sentencepiece model; returns the `.model` path.

    `split_digits=False` lets BPE merge whole numbers into single tokens: a tiny model then
    learns small-number arithmetic as lookups instead of digit-by-digit carries.

    `lines_or_path` is a text file (one sentence per line) or an iterable of lines. Settings are
    chosen so any text round-trips through encode/decode: identity normalization, no collapsing of
    whitespace, no dummy prefix (which would add a space before every chat-template segment), and
    byte fallback for characters the corpus never had. Chat markup and think tags are
    user-defined symbols so text containing them encodes to one token each.
    If the corpus is too small for `vocab_size`, the vocab comes out smaller instead of failing.
    """
    import sentencepiece as spm

    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines_or_path, str | os.PathLike):
        source = {"input": str(lines_or_path)}
    else:
        source = {"sentence_iterator": iter(lines_or_path)}
    spm.SentencePieceTrainer.train(
        **source,
        model_prefix=str(out_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        user_defined_symbols=[THINK_OPEN, THINK_CLOSE, IM_START, IM_END],
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=split_digits,
        # A sample is plenty for a tokenizer; this keeps training to seconds on any corpus.
        input_sentence_size=200_000,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    return out_prefix.with_name(out_prefix.name + ".model")
