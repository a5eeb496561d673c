"""Splitting a trace's reasoning into the steps a PRM scores.

In:  the `reasoning` of a trace (inside <think>...</think>).
Out: a list of step strings, or a status saying why the trace can't be split within limits.

The default is blank-line separated steps: that is how PRM training data (PRM800K, Math-Shepherd,
ProcessBench) and R1 traces delimit steps. Limits on the number and length of steps are never
applied silently: a trace over a limit gets a status (too_many_steps, step_too_long) and is
not scored, rather than scored on a cut-down version of itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MODES = ("blank_line", "step_markers", "newline", "regex")
OK, NO_REASONING, TOO_MANY_STEPS, STEP_TOO_LONG = "ok", "no_reasoning", "too_many_steps", "step_too_long"


@dataclass
class SplitConfig:
    mode: str = "blank_line"
    """blank_line (paragraphs) | step_markers ("Step 1:", "Step 2:" ...) | newline | regex."""
    pattern: str | None = None
    """mode=regex: the separator regex (re.split)."""
    max_steps: int = 64
    """Traces with more steps are not scored (status too_many_steps)."""
    max_step_chars: int = 4000
    """Traces with a longer step are not scored (status step_too_long)."""


STEP_MARKER = re.compile(r"(?im)^\s*(?:#+\s*)?step\s*\d+\s*[:.)]")


def split_steps(reasoning: str | None, cfg: SplitConfig) -> tuple[list[str], str]:
    """(steps, status); status is "ok" or why the trace can't be scored within limits."""
    if reasoning is None or not reasoning.strip():
        return [], NO_REASONING
    text = reasoning.strip()
    if cfg.mode == "blank_line":
        parts = re.split(r"\n\s*\n", text)
    elif cfg.mode == "newline":
        parts = text.split("\n")
    elif cfg.mode == "step_markers":
        starts = [m.start() for m in STEP_MARKER.finditer(text)]
        if not starts or starts[0] != 0:
            starts = [0] + starts  # text before the first marker is a step of its own
        parts = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    elif cfg.mode == "regex":
        if not cfg.pattern:
            raise ValueError("split.mode=regex needs split.pattern")
        parts = re.split(cfg.pattern, text)
    else:
        raise ValueError(f"split.mode={cfg.mode!r}; use one of {', '.join(MODES)}")
    steps = [p.strip() for p in parts if p and p.strip()]
    if not steps:
        return [], NO_REASONING
    if len(steps) > cfg.max_steps:
        return steps, TOO_MANY_STEPS
    if max(len(s) for s in steps) > cfg.max_step_chars:
        return steps, STEP_TOO_LONG
    return steps, OK
