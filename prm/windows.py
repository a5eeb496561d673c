"""Windows: how a PRM reads a trace longer than its context, a piece at a time.

In:  the token count of each step of one trace (as the PRM renders it), the room for steps in
     one PRM input (its context less its own prompt: system, question), the prompt's size.
Out: a list of windows; each holds the prompt, some steps the PRM reads as context and does
     not score, then the steps it scores. Every step is scored in exactly one window.

The PRMs here are causal (a step's score depends only on what precedes it), so a step's score
is as informed as the preceding context its window gives it. A window's context is as many of
the preceding steps as fit in `context` tokens; after it, as many steps as fit are scored, and
the next window starts where this one stopped scoring. A step is scored in the window where it
has the most preceding context: the next window would hold it, if at all, as context closer to
that window's start. The context size is chosen per trace: the largest one whose windows read
at most `read_factor` times the tokens of the trace rendered once (prompt included), so a
trace just over the context gets a large context and a very long one a third or so of the
window (at 1.5). A trace that fits is one window, read as it always was.

The token counts are those of the whole trace's rendering; a window rendered on its own can
tokenize its first step a token differently, so the caller's `fits(start, end)` checks each
planned window as it really encodes, and the plan gives up a scored step (or a context step)
where one does not fit.

    plan = plan_windows(lengths, room, prompt, read_factor=1.5, fits=...)   # None: a step can't fit
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Window:
    start: int
    """First step in the window: steps start..scored-1 are context."""
    scored: int
    """First step the window scores."""
    end: int
    """One past the last step it scores."""


def greedy(lengths: list[int], room: int, context: int,
           fits: Callable[[int, int], bool] | None = None) -> list[Window] | None:
    """Windows with up to `context` tokens of preceding steps each; None when a step alone is
    longer than `room` (or, with `fits`, does not fit as encoded)."""
    out, j, n = [], 0, len(lengths)
    while j < n:
        a, ctx = j, 0
        while a > 0 and ctx + lengths[a - 1] <= context:
            a -= 1
            ctx += lengths[a]
        while a < j and ctx + lengths[j] > room:  # step j needs the room the context took
            ctx -= lengths[a]
            a += 1
        if lengths[j] > room:
            return None
        b, used = j, ctx
        while b < n and used + lengths[b] <= room:
            used += lengths[b]
            b += 1
        if fits is not None:
            while not fits(a, b):
                if b > j + 1:  # the next window picks the step up
                    b -= 1
                elif a < j:
                    a += 1
                else:
                    return None
        out.append(Window(a, j, b))
        j = b
    return out


def tokens_read(windows: list[Window], lengths: list[int], prompt: int) -> int:
    return sum(prompt + sum(lengths[w.start: w.end]) for w in windows)


def least_context(windows: list[Window], lengths: list[int]) -> int | None:
    """The fewest tokens of preceding steps a step was scored with, over the steps that did not
    see every step before them (the first step a window scores has the least of its window);
    None when every step saw the whole trace before it."""
    cut = [sum(lengths[w.start: w.scored]) for w in windows if w.start > 0]
    return min(cut) if cut else None


def plan_windows(lengths: list[int], room: int, prompt: int, read_factor: float = 1.5,
                 fits: Callable[[int, int], bool] | None = None) -> list[Window] | None:
    """The windows for a trace that does not fit in one: the largest context whose windows
    read at most read_factor x (prompt + all steps) tokens, found by bisection (a long prompt
    repeated per window can put even no context over that: then there is none)."""
    budget = read_factor * (prompt + sum(lengths))
    if greedy(lengths, room, 0) is None:
        return None
    lo, hi = 0, room
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens_read(greedy(lengths, room, mid), lengths, prompt) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return greedy(lengths, room, lo, fits)
