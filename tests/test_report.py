"""The HTML charts show their numbers: a ticked y axis, and each bar's value written over it."""

import re

from factory.run.report import nice_ticks, svg_bars, svg_lines


def texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_ticks_cover_the_largest_value_in_round_steps():
    assert nice_ticks(0.93, True) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(0.449, True) == [0.0, 0.2, 0.4, 0.6]
    assert nice_ticks(812, False) == [0, 250, 500, 750, 1000]
    assert nice_ticks(0, False) == [0.0, 1.0]


def test_bars_have_an_axis_and_their_values():
    svg = svg_bars("pass@1 by level", ["L1", "L2"], {"base": [0.401, 0.045], "sft": [0.849, 0.022]})
    shown = texts(svg)
    for tick in ("0%", "25%", "50%", "75%", "100%"):
        assert tick in shown, tick
    for value in ("40.1%", "4.5%", "84.9%", "2.2%"):  # every bar's value, written over it
        assert value in shown, value
    assert {"L1", "L2", "base", "sft", "pass rate"} <= set(shown)
    # a bar's height is its value on the axis: 84.9% of the 0..100% span
    heights = [float(h) for h in re.findall(r'<rect x="[^"]*" y="[^"]*" width="[^"]*" height="([^"]*)"', svg)]
    assert abs(heights[1] / heights[0] - 0.849 / 0.401) < 0.01  # L1: base, then sft
    counts = svg_bars("traces", ["0.0", "0.1"], {"traces": [812, 30]}, pct=False)
    assert {"812", "30", "0", "1000"} <= set(texts(counts))


def test_lines_have_both_axes_and_the_last_values():
    svg = svg_lines("reward", [5, 10, 15, 120], {"accuracy": [0.4, 0.5, 0.6, 0.71]})
    shown = texts(svg)
    assert {"0", "0.2", "0.4", "0.6", "0.8"} <= set(shown)  # y ticks
    assert "0.71" in shown and "step" in shown and "5" in shown  # the last value, the x axis
