"""Reading a trace: the `<think>` block, the answer part, and the final answer in it.

Pure string functions shared by rollout (which records reasoning / answer_text) and grade
(which extracts the final answer). Extraction order: the `\\boxed{...}` answers of the answer
part (`answer_boxes`: several distinct ones are one multi-part answer, source `boxes`, which
grade compares with the reference as a whole; one box, or one written out again, is read as
its last box, as before), then an `<answer>` tag or an "answer is" / "Final answer:" line,
then the recipe's own regex patterns (first group), each tried on the answer part before the
whole text.
With `fallback` (grade does it for the math and numeric domains), an answer part that has
none of these gives its last LaTeX expression (`fallback_latex`) or its last number
(`fallback_number`), the way math-verify's own extraction reads a bare final line; the
source is kept so a user can filter on it. A trace whose `<think>` never closed has no
answer part and no fallback: the last number of unfinished reasoning is not an answer.

References are read here too (`reference_answer`): a worked solution's last `\\boxed{}` (its
boxes joined, when it boxes several parts), or what follows GSM8K's `####`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str | None  # inside the think block; None when no block was opened
    answer_text: str | None  # after </think>; None when the block never closed
    think_closed: bool


def split_think(text: str) -> Split:
    """Split a completion into its reasoning and answer parts.

    A completion may lack the opening tag when the chat template prefilled it (R1-distill
    templates end the prompt with "<think>\\n"); rollout restores it before calling this.
    A completion with no think block at all is all answer (reasoning None).
    """
    open_at = text.find(THINK_OPEN)
    close_at = text.find(THINK_CLOSE, open_at + 1 if open_at >= 0 else 0)
    if open_at < 0 and close_at < 0:
        return Split(None, text, False)
    if close_at < 0:
        return Split(text[open_at + len(THINK_OPEN):].strip(), None, False)
    start = open_at + len(THINK_OPEN) if 0 <= open_at < close_at else 0
    return Split(text[start:close_at].strip(), text[close_at + len(THINK_CLOSE):].strip(), True)


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if none closes."""
    best = None
    for m in _BOX.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            best = text[m.end(): i - 1]
    return best.strip() if best is not None else None


def all_boxed(text: str) -> list[str]:
    """Contents of every outermost \\boxed{...} (or \\fbox{...}) that closes, in order; a box
    inside a box is read as its inner box (the way `last_boxed` reads one)."""
    out, pos = [], 0
    while (m := _BOX.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # never closes: a box opened inside it may
            pos = m.end()
            continue
        inner = text[m.end(): i - 1]
        out.append((last_boxed(inner) if _BOX.search(inner) else inner.strip()) or "")
        pos = i
    return out


def as_completion(answer: str) -> str:
    """An extracted answer as a completion that grades as exactly that answer (the vote compares
    answers through the grader). An empty think block first: an answer that holds "</think>"
    itself (a garbled trace's) must not split inside its own box."""
    return f"{THINK_OPEN}{THINK_CLOSE}\\boxed{{{answer}}}"


def answer_boxes(text: str) -> list[str]:
    """The boxed answers of a completion's answer part, in order, empty boxes left out.

    A run of boxes written out again (R1 often states its answer, then repeats it under
    "Final Answer") counts once: when the sequence is one block repeated, its last copy is
    kept. [] when the think block never closed: an unfinished trace is read by its last box
    only (`extract_answer`), never as a multi-part answer."""
    part = split_think(text).answer_text
    return [] if part is None else _said_once(all_boxed(part))


def _said_once(boxes: list[str]) -> list[str]:
    """Non-empty boxes; a sequence that is one block repeated (spaces aside) as its last copy."""
    boxes = [b for b in boxes if b]
    keys = [re.sub(r"\s+", "", b) for b in boxes]
    for period in range(1, len(keys)):
        if len(keys) % period == 0 and keys == keys[:period] * (len(keys) // period):
            return boxes[-period:]
    return boxes


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_ANSWER_LINE = re.compile(
    r"(?:final answer|the answer is|answer)\s*(?:is)?\s*[:：]?\s*(.+?)\s*(?:$|\n)", re.I
)


_LATEX = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.S)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def fallback_answer(part: str) -> tuple[str | None, str]:
    """The last LaTeX expression of an answer part, else its last number."""
    latex = [next(g for g in m.groups() if g is not None).strip() for m in _LATEX.finditer(part)]
    latex = [x for x in latex if x]
    if latex:
        return latex[-1], "fallback_latex"
    numbers = _NUMBER.findall(part)
    if numbers:
        return numbers[-1].rstrip(","), "fallback_number"
    return None, "none"


def extract_answer(text: str, patterns: list[str] = (), fallback: bool = False) -> tuple[str | None, str]:
    """The final answer of a completion and where it came from.

    Returns:
        (answer or None, source) with source one of boxes | boxed | answer_tag | answer_line |
        pattern | fallback_latex | fallback_number | none. For `boxes` (several distinct boxed
        answers) the answer is the boxes joined by ", "; grade compares `answer_boxes` itself.
    """
    boxes = answer_boxes(text)
    if len(boxes) > 1:
        return ", ".join(boxes), "boxes"
    part = split_think(text).answer_text
    scopes = [part] if part is not None else [text]
    for scope in scopes:
        boxed = last_boxed(scope)
        if boxed:
            return boxed, "boxed"
        tag = _ANSWER_TAG.findall(scope)
        if tag and tag[-1].strip():
            inner = tag[-1].strip()
            return last_boxed(inner) or inner, "answer_tag"
        lines = _ANSWER_LINE.findall(scope)
        if lines:
            return lines[-1].strip().rstrip("."), "answer_line"
    for pat in patterns:
        found = re.findall(pat, text)
        if found:
            last = found[-1]
            return (last[0] if isinstance(last, tuple) else last).strip(), "pattern"
    if fallback and part is not None and part.strip():
        return fallback_answer(part)
    return None, "none"


GSM8K_MARK = "####"


def reference_answer(text: str, how: str = "auto") -> str | None:
    """The final answer inside a reference column.

    how: boxed (the last \\boxed{}; a solution that boxes several distinct parts gives them
    all, joined by ", ", as a trace's several boxes are read), gsm8k (after the last ####,
    thousands separators removed), auto (boxed if there is one, else after ####, else the
    text itself). None when `how` names a form the text does not have."""
    if how in ("boxed", "auto"):
        parts = _said_once(all_boxed(text))
        if len(parts) > 1:
            return ", ".join(parts)
        boxed = last_boxed(text)
        if boxed or how == "boxed":
            return boxed or None
    if how in ("gsm8k", "auto"):
        if GSM8K_MARK in text:
            tail = text.rsplit(GSM8K_MARK, 1)[1].strip()
            tail = re.sub(r"(?<=\d),(?=\d{3}\b)", "", tail)
            return tail.rstrip(".") or None
        if how == "gsm8k":
            return None
    return text


def format_ok(text: str) -> bool:
    """R1 format: the text opens with <think>, closes it after some reasoning, then answers."""
    s = split_think(text)
    return bool(text.lstrip().startswith(THINK_OPEN) and s.think_closed and s.reasoning and s.answer_text)


def vote_key(answer: str) -> str:
    """An extracted answer as a majority vote counts it: case and whitespace ignored."""
    return re.sub(r"\s+", "", answer).lower()
