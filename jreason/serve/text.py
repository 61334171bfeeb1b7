"""Token ids -> the text a client sees, incrementally: stop strings, UTF-8 and `<think>` splits.

The server streams a completion while it grows, so the text sent so far must never need taking
back. Three things could force that, and each is handled by holding a little text back until it
is decided:
- a multi-byte character split over byte-fallback tokens decodes to U+FFFD until its last byte
  arrives: trailing U+FFFD is held back (a final text keeps it: those bytes were invalid);
- a stop string is cut from the output together with everything after it (OpenAI semantics),
  so a suffix that could be the start of a stop string is held back;
- chat completions report the thinking (`reasoning_content`) apart from the answer
  (`content`); a suffix that could be the start of `</think>` is held back, and the whitespace
  that `split_thinking` strips around the tags is held until more text decides it.

Every function here maps the *whole* token list to the text visible so far (re-decoding the
trace each time costs microseconds at these lengths and, unlike decoding token by token, gets
sentencepiece's and tokenizers' spacing rules right); `TextStream` remembers what was sent and
returns the new suffix. What was visible before is always a prefix of what is visible later,
and the final text equals what the non-streaming response returns.
"""

from __future__ import annotations

from collections.abc import Sequence

from jreason.tokenizer import THINK_CLOSE, THINK_OPEN

REPLACEMENT = "\ufffd"


def _partial_suffix(text: str, needles: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`."""
    best = 0
    for needle in needles:
        for k in range(min(len(needle) - 1, len(text)), best, -1):
            if text.endswith(needle[:k]):
                best = k
                break
    return best


def visible_text(tokenizer, tokens: Sequence[int], stop: Sequence[str], final: bool) -> str:
    """The completion text of `tokens` that is safe to show: special tokens (the end-of-turn
    token among them) dropped, cut before the first stop string, undecided suffixes held back
    unless `final`."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut]
    if final:
        return text
    text = text.rstrip(REPLACEMENT)
    return text[: len(text) - _partial_suffix(text, stop)]


def split_reasoning(text: str, started_thinking: bool, final: bool) -> tuple[str, str]:
    """(reasoning, content) of a chat completion, as `tokenizer.split_thinking` splits it.

    A completion is in thinking mode if the prompt opened a think block (`started_thinking`,
    R1-style templates) or the text opens one itself; then everything before the first
    `</think>` is reasoning and the rest is the answer, each stripped as `split_thinking` does.
    Otherwise it is all answer (where `split_thinking` would still split at a stray `</think>`:
    a stream cannot take back text already sent as content).
    """
    lead = text.lstrip()
    if lead.startswith(THINK_OPEN):
        body = lead[len(THINK_OPEN) :]
    elif not final and THINK_OPEN.startswith(lead):
        return "", ""  # blank or a prefix of "<think>" so far: may still open a think block
    elif started_thinking:
        body = text
    else:
        return "", text
    head, sep, tail = body.partition(THINK_CLOSE)
    if sep:
        return head.strip(), tail.lstrip()
    if final:
        return head.strip(), ""
    head = head[: len(head) - _partial_suffix(head, [THINK_CLOSE])]
    return head.strip(), ""  # trailing whitespace waits: stripped if "</think>" follows


class TextStream:
    """The text of one choice, released piece by piece as its tokens arrive."""

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, chat: bool, started_thinking: bool):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.chat, self.started_thinking = chat, started_thinking
        self.sent_reasoning, self.sent_content = 0, 0

    def texts(self, tokens: Sequence[int], final: bool) -> tuple[str, str]:
        """(reasoning, content) visible for `tokens`; reasoning is "" for plain completions."""
        text = visible_text(self.tokenizer, tokens, self.stop, final)
        if not self.chat:
            return "", text
        return split_reasoning(text, self.started_thinking, final)

    def update(self, tokens: Sequence[int], final: bool = False) -> tuple[str, str]:
        """(new reasoning, new content) since the last call."""
        reasoning, content = self.texts(tokens, final)
        # visible text only grows (see the module docstring); never send a piece twice
        new_r, new_c = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return new_r, new_c
