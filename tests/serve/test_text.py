"""Incremental detokenization: streamed pieces never break a character, never show a stop
string, never need taking back, and add up to the non-streamed text."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jreason.serve.text import TextStream, split_reasoning, visible_text
from jreason.tokenizer import load_tokenizer, split_thinking


class ByteTokenizer:
    """Token i is byte i: decoding a prefix cuts multi-byte characters like byte fallback."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_all(ts: TextStream, tokens, step_sizes):
    """Feeds growing prefixes of `tokens`, then the final call; returns the pieces."""
    pieces, n = [], 0
    for k in step_sizes:
        n = min(n + k, len(tokens))
        pieces.append(ts.update(tokens[:n]))
    pieces.append(ts.update(tokens, final=True))
    return pieces


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


def test_multibyte_characters_stream_whole(tok):
    text = "12 + 7 = 19 héllo wörld, 日本語 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.encode()) // 2  # byte fallback: several tokens per character
    ts = TextStream(tok, chat=False, started_thinking=False)
    pieces = [ts.update(ids[:n])[1] for n in range(1, len(ids) + 1)]
    pieces.append(ts.update(ids, final=True)[1])
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 10  # it did stream, not hold everything to the end


def test_stop_string_is_cut_and_never_streamed(tok):
    text = "4 + 4 = 8 STOP and more"
    ids = tok.encode(text)
    ts = TextStream(tok, ["STOP", "zzz"], chat=False, started_thinking=False)
    pieces = [ts.update(ids[:n])[1] for n in range(1, len(ids) + 1)]
    assert "".join(pieces) == "4 + 4 = 8 "
    assert visible_text(tok, ids, ["STOP"], final=True) == "4 + 4 = 8 "


def test_reasoning_split_streams_like_split_thinking(tok):
    text = "  let me think:\n 2 + 2 = 4 \n</think>\n\nThe answer is 4."
    ids = tok.encode(text)
    ts = TextStream(tok, chat=True, started_thinking=True)
    pieces = [ts.update(ids[:n]) for n in range(1, len(ids) + 1)]
    pieces.append(ts.update(ids, final=True))
    reasoning = "".join(r for r, _ in pieces)
    content = "".join(c for _, c in pieces)
    assert (reasoning, content) == split_thinking(text, started_thinking=True)
    assert not any("<" in r for r, _ in pieces)  # no half "</think>" leaked into reasoning


stop_strategy = st.lists(
    st.text(st.sampled_from("ab </think>é日"), min_size=1, max_size=4), max_size=2
)
pieces_strategy = st.lists(
    st.sampled_from(["a", "b", " ", "\n", "é", "日本", "🙂", "<think>", "</think>", "</thi"]),
    max_size=12,
)


@settings(max_examples=int(os.environ.get("JREASON_HYPOTHESIS_EXAMPLES", 300)), deadline=None)
@given(
    parts=pieces_strategy,
    cut_bytes=st.lists(st.integers(1, 5), min_size=1, max_size=40),
    stop=stop_strategy,
    chat=st.booleans(),
    started=st.booleans(),
)
def test_stream_adds_up_to_the_final_text(parts, cut_bytes, stop, chat, started):
    tokens = list("".join(parts).encode())
    ts = TextStream(ByteTokenizer(), stop, chat=chat, started_thinking=started)
    seen_r, seen_c = "", ""
    pieces = stream_all(ts, tokens, cut_bytes)
    for r, c in pieces:
        seen_r, seen_c = seen_r + r, seen_c + c
        assert "\ufffd" not in r + c  # a character split across tokens is never sent broken
    final = TextStream(ByteTokenizer(), stop, chat=chat, started_thinking=started)
    assert (seen_r, seen_c) == final.texts(tokens, final=True)
    text = visible_text(ByteTokenizer(), tokens, stop, final=True)
    assert not any(s in text for s in stop)
    if chat and started:
        assert (seen_r, seen_c) == split_thinking(text, started_thinking=True)


def test_split_reasoning_without_thinking_mode_is_all_content():
    assert split_reasoning("plain answer", started_thinking=False, final=True) == (
        "",
        "plain answer",
    )
    assert split_reasoning("<think>x</think> y", started_thinking=False, final=True) == ("x", "y")
    assert split_reasoning("<thi", started_thinking=False, final=False) == ("", "")
