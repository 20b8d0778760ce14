"""The benchmarks' goals, checked: a figure that misses its goal says so in the output (a line,
and a GoalMissed warning in pytest's summary, shown without -s) and in the JSON
(extra_info: goal, goal_met, and goals: every goal of the benchmark with its value), so a
regression shows. HCLSIM_BENCH_STRICT=1 makes a missed goal fail the benchmark.

    from hclsim.benches.goals import check_goal, median_s
    check_goal(benchmark, "shim entry -> handoff, 64 vCPUs", median_s(benchmark) * 1e3, 20, unit=" ms")
"""
import os
import warnings

import pytest

STRICT_ENV = "HCLSIM_BENCH_STRICT"


class GoalMissed(UserWarning):
    """A benchmark figure missed its goal."""


def median_s(benchmark) -> float | None:
    """The benchmark's median in seconds, None when it was not timed (--benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    stats = getattr(stats, "stats", None)
    return getattr(stats, "median", None)


def check_goal(benchmark, figure: str, value: float | None, goal: float, *, at_most: bool = True,
               strict: bool = False, unit: str = "") -> bool | None:
    """Compare value with goal (at_most: value <= goal, else value >= goal; strict: < or >),
    record it in benchmark.extra_info and say so; the result (None: nothing was measured)."""
    op = ("<" if strict else "<=") if at_most else (">" if strict else ">=")
    goal_text = f"{op} {goal:g}{unit}"
    info = benchmark.extra_info
    goals = info.setdefault("goals", {})
    if value is None:
        goals[figure] = {"value": None, "goal": goal_text, "goal_met": None}
        return None
    if at_most:
        met = value < goal if strict else value <= goal
    else:
        met = value > goal if strict else value >= goal
    goals[figure] = {"value": round(value, 6), "goal": goal_text, "goal_met": met}
    info["goal"] = goal_text if len(goals) == 1 else "; ".join(f"{k}: {g['goal']}" for k, g in goals.items())
    info["goal_met"] = all(g["goal_met"] is not False for g in goals.values())
    line = f"{figure}: {value:.4g}{unit}, goal {goal_text}: {'met' if met else 'MISSED'}"
    print(f"\n{'' if met else 'GOAL MISSED: '}{line}")
    if not met:
        warnings.warn(GoalMissed(line), stacklevel=2)
        if os.environ.get(STRICT_ENV):
            pytest.fail(f"goal missed: {line}", pytrace=False)
    return met
