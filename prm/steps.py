"""Splitting a trace's reasoning into the steps a PRM scores.

In:  the `reasoning` of a trace (inside <think>...</think>).
Out: a list of step strings and a status (ok, or no_reasoning).

The default is blank-line separated steps: that is how PRM training data (PRM800K, Math-Shepherd,
ProcessBench) and R1 traces delimit steps. R1 writes many one-line paragraphs ("Wait.", "Let me
check."); `merge_tokens` joins consecutive ones into steps of up to that many PRM tokens, so a
step is a unit of reasoning rather than a line. There is no ceiling on the number of steps or
their length here: the scorer reads a trace longer than its context in windows (prm.windows),
and a single step too long to fit beside the question is read in pieces (`cut_step`, used by the
scorer with `prm.cut_long_steps`, the default); without that such a trace says so (status
step_exceeds_context).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

MODES = ("blank_line", "step_markers", "newline", "regex")
OK, NO_REASONING = "ok", "no_reasoning"

CountTokens = Callable[[list[str]], list[int]]
"""Token counts of many texts (the PRM's tokenizer, batched)."""


@dataclass
class SplitConfig:
    mode: str = "blank_line"
    """blank_line (paragraphs) | step_markers ("Step 1:", "Step 2:" ...) | newline | regex."""
    pattern: str | None = None
    """mode=regex: the separator regex."""
    merge_tokens: int | None = None
    """Join consecutive steps into one while it stays within this many tokens of the PRM's
    tokenizer (a step longer than that stays alone); the original text between them is kept.
    None: every part the split finds is a step."""


STEP_MARKER = re.compile(r"(?im)^\s*(?:#+\s*)?step\s*\d+\s*[:.)]")


def _spans(text: str, cfg: SplitConfig) -> list[tuple[int, int]]:
    """[start, end) of each part of `text`, separators left out."""
    if cfg.mode == "step_markers":
        starts = [m.start() for m in STEP_MARKER.finditer(text)]
        if not starts or starts[0] != 0:
            starts = [0] + starts  # text before the first marker is a step of its own
        return list(zip(starts, starts[1:] + [len(text)]))
    if cfg.mode == "regex" and not cfg.pattern:
        raise ValueError("split.mode=regex needs split.pattern")
    separator = {"blank_line": r"\n\s*\n", "newline": r"\n", "regex": cfg.pattern}.get(cfg.mode)
    if separator is None:
        raise ValueError(f"split.mode={cfg.mode!r}; use one of {', '.join(MODES)}")
    cuts = [(m.start(), m.end()) for m in re.finditer(separator, text)]
    ends = [a for a, _ in cuts] + [len(text)]
    starts = [0] + [b for _, b in cuts]
    return list(zip(starts, ends))


def split_parts(reasoning: str | None, cfg: SplitConfig) -> tuple[str, list[tuple[int, int]]]:
    """The stripped reasoning and the [start, end) spans of its non-empty parts, unmerged."""
    text = (reasoning or "").strip()
    if not text:
        return text, []
    spans = []
    for a, b in _spans(text, cfg):
        piece = text[a:b]
        if piece.strip():  # trim the span to the part's own text
            a += len(piece) - len(piece.lstrip())
            b -= len(piece) - len(piece.rstrip())
            spans.append((a, b))
    return text, spans


def merge_spans(text: str, spans: list[tuple[int, int]], max_tokens: int, count: CountTokens) -> list[tuple[int, int]]:
    """Consecutive spans joined while their tokens (counted part by part) stay within max_tokens."""
    sizes = count([text[a:b] for a, b in spans])
    out: list[tuple[int, int]] = []
    size = 0
    for (a, b), n in zip(spans, sizes):
        if out and size + n <= max_tokens:
            out[-1] = (out[-1][0], b)
            size += n
        else:
            out.append((a, b))
            size = n
    return out


def split_steps(reasoning: str | None, cfg: SplitConfig, count: CountTokens | None = None) -> tuple[list[str], str]:
    """(steps, status); status is "ok" or "no_reasoning". `count` is needed with merge_tokens."""
    steps, _, status = split_and_merge(reasoning, cfg, count)
    return steps, status


def split_and_merge(reasoning: str | None, cfg: SplitConfig, count: CountTokens | None = None) -> tuple[list[str], int, str]:
    """(steps, number of parts before merging, status)."""
    text, spans = split_parts(reasoning, cfg)
    if not spans:
        return [], 0, NO_REASONING
    parts = len(spans)
    if cfg.merge_tokens is not None:
        if count is None:
            raise ValueError("split.merge_tokens counts tokens, and this caller has no tokenizer to count with")
        spans = merge_spans(text, spans, cfg.merge_tokens, count)
    return [text[a:b] for a, b in spans], parts, OK


def cut_step(text: str, max_tokens: int, count: CountTokens) -> list[str]:
    """A step too long for the PRM cut into consecutive pieces of at most ~max_tokens tokens:
    at line breaks, then at spaces, then (a run of symbols with neither) at characters. The
    pieces joined give the step back. Token counts are per unit, so a piece can come out a token
    or two over as encoded; the scorer leaves room for that."""
    units = _units(text, max_tokens, count, (r"(?<=\n)", r"(?<= )"))
    pieces: list[str] = []
    size = 0
    for u, n in zip(units, count(units)):
        if pieces and size + n <= max_tokens:
            pieces[-1] += u
            size += n
        else:
            pieces.append(u)
            size = n
    out: list[str] = []
    for piece in pieces:  # a piece of whitespace alone goes with the piece before it
        if out and not piece.strip():
            out[-1] += piece
        else:
            out.append(piece)
    if len(out) > 1 and not out[0].strip():
        out[1] = out[0] + out[1]
        out.pop(0)
    return out


def _units(text: str, max_tokens: int, count: CountTokens, seps: tuple[str, ...]) -> list[str]:
    """`text` split at the first separator, each part still over max_tokens split at the next;
    past the last, a part is cut into chunks of characters of about max_tokens / 2 tokens."""
    if not seps:
        (n,) = count([text])
        if n <= max_tokens or len(text) < 2:
            return [text]
        width = max(1, len(text) * max_tokens // (2 * n))
        return [text[i:i + width] for i in range(0, len(text), width)]
    parts = [p for p in re.split(seps[0], text) if p]
    out: list[str] = []
    for part, n in zip(parts, count(parts)):
        out.extend([part] if n <= max_tokens else _units(part, max_tokens, count, seps[1:]))
    return out
