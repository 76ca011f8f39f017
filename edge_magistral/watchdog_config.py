"""The [THINK] watchdog's settings and the arithmetic of a think budget.

A turn needs room for ``[THINK]``, the budget plus a grace window (to close at a sentence end),
the wrap-up sentence with ``[/THINK]`` and a minimal answer, all within ``max_tokens``: a budget
that does not fit is clipped, one that cannot reach ``min_think_budget`` is refused with the
``max_tokens`` that would work. Greedy decoding makes a reasoning model loop, so a thinking turn's
temperature is raised to at least :data:`MIN_THINKING_TEMPERATURE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_magistral.errors import BadInputError
from edge_magistral.tekken import END_THINK, EOS, THINK

WRAP_UP_TEXT = (
    "\n\nConsidering the limited time, I have to give the solution based on the thinking directly now.\n"
)
MIN_THINKING_TEMPERATURE = 0.5  # below this, reasoning models fall into loops (greedy is the worst)


@dataclass(frozen=True)
class WatchdogConfig:
    """Limits for one turn. ``think_budget=None`` means as much as ``max_tokens`` leaves room for."""

    think_budget: int | None = 8192
    grace_fraction: float = 0.10  # how long to wait past the budget for a sentence end ...
    grace_max: int = 256  # ... at most this many tokens
    answer_budget: int | None = None
    max_tokens: int = 40960  # all generated tokens: thought, wrap-up and answer
    deadline_s: float | None = None
    think_deadline_fraction: float = 0.75
    ttft_deadline_s: float | None = None
    wrap_up_text: str = WRAP_UP_TEXT
    wrap_up_reserve: int = 32  # tokens kept for the wrap-up and [/THINK] when clipping the budget
    answer_reserve: int = 256  # tokens kept for the answer when clipping the budget
    min_think_budget: int = 64  # a clipped budget below this is refused (BadInputError)
    min_answer_tokens: int = 1  # non-blank answer tokens before </s> is allowed
    max_violations: int = 8
    loop_max_period: int = 64  # exact periodic tail: pattern sizes 1..loop_max_period ...
    loop_min_repeats: int = 4  # ... repeated at least this often ...
    loop_min_span: int = 48  # ... and covering at least this many tokens ("the the" is no loop)
    novelty_n: int = 4  # n-gram size of the novelty measure
    novelty_window: int = 512  # tokens in its sliding window
    novelty_min_thinking: float = 0.35  # distinct n-grams / n-grams below this is a loop (thought)
    novelty_min_answer: float = 0.25  # ... in the answer, where a false stop costs more
    think_id: int = THINK
    end_think_id: int = END_THINK
    eos_id: int = EOS

    def __post_init__(self) -> None:
        for problem in _config_problems(self):
            raise BadInputError(f"invalid watchdog setting: {problem}")


def _config_problems(c: WatchdogConfig) -> list[str]:
    """Every setting out of range, described so that the caller knows what to change."""
    checks = [
        (c.think_budget is None or c.think_budget >= 0, "think_budget must be >= 0 (0 = no thinking)"),
        (0.0 <= c.grace_fraction <= 1.0, "grace_fraction must be within [0, 1]"),
        (c.grace_max >= 0, "grace_max must be >= 0"),
        (c.answer_budget is None or c.answer_budget >= 1, "answer_budget must be >= 1"),
        (c.max_tokens >= 1, "max_tokens must be >= 1"),
        (c.deadline_s is None or c.deadline_s > 0, "deadline_s must be > 0"),
        (0.0 < c.think_deadline_fraction <= 1.0, "think_deadline_fraction must be within (0, 1]"),
        (c.ttft_deadline_s is None or c.ttft_deadline_s > 0, "ttft_deadline_s must be > 0"),
        (c.wrap_up_reserve >= 1, "wrap_up_reserve must be >= 1"),
        (c.answer_reserve >= 0, "answer_reserve must be >= 0"),
        (c.min_think_budget >= 1, "min_think_budget must be >= 1"),
        (c.min_answer_tokens >= 0, "min_answer_tokens must be >= 0"),
        (c.max_violations >= 1, "max_violations must be >= 1"),
        (c.loop_max_period >= 1 and c.loop_min_repeats >= 2 and c.loop_min_span >= 2,
         "loop_max_period >= 1, loop_min_repeats >= 2, loop_min_span >= 2"),
        (1 <= c.novelty_n < c.novelty_window, "novelty_n must be >= 1 and < novelty_window"),
        (0.0 <= c.novelty_min_thinking <= 1.0 and 0.0 <= c.novelty_min_answer <= 1.0,
         "novelty thresholds must be within [0, 1]"),
        (len({c.think_id, c.end_think_id, c.eos_id}) == 3, "think_id, end_think_id and eos_id must differ"),
    ]
    return [message for ok, message in checks if not ok]


# ------------------------------------------------------------------------------ helpers


def check_sampling(temperature: float, thinking: bool) -> tuple[float, str | None]:
    """The temperature to use and why it was changed (None if unchanged).

    Greedy or near-greedy decoding makes reasoning models repeat themselves until the budget,
    so in thinking mode the temperature is raised to :data:`MIN_THINKING_TEMPERATURE`.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise BadInputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if thinking and temperature < MIN_THINKING_TEMPERATURE:
        return MIN_THINKING_TEMPERATURE, (
            f"temperature {temperature:g} raised to {MIN_THINKING_TEMPERATURE:g}: greedy decoding makes a "
            "reasoning model loop (pass think_budget=0 to answer without thinking at this temperature)")
    return temperature, None


def grace_tokens(budget: int, config: WatchdogConfig) -> int:
    """How many tokens past the budget the close may wait for a sentence end."""
    return min(config.grace_max, int(budget * config.grace_fraction))


def resolve_think_budget(config: WatchdogConfig) -> tuple[int, bool]:
    """The effective think budget and whether it was clipped to fit ``max_tokens``.

    The turn needs room for [THINK], budget + grace, the wrap-up and a minimal answer. A budget
    that does not fit is clipped; one that cannot reach ``min_think_budget`` is refused.
    """
    wanted = config.think_budget
    if wanted == 0:
        return 0, False
    answer_reserve = min(config.answer_reserve, config.answer_budget or config.answer_reserve)
    room = config.max_tokens - 1 - config.wrap_up_reserve - answer_reserve
    if wanted is not None and wanted + grace_tokens(wanted, config) <= room:
        return wanted, False
    fits = _largest_fitting_budget(room, config)
    if fits < config.min_think_budget:
        smallest = config.min_think_budget
        need = smallest + grace_tokens(smallest, config) + config.max_tokens - room
        raise BadInputError(
            f"max_tokens={config.max_tokens} leaves no room to think: the smallest think budget "
            f"({smallest} tokens, plus grace, [THINK], a {config.wrap_up_reserve}-token wrap-up and a "
            f"{answer_reserve}-token answer) needs max_tokens >= {need}; "
            "raise max_tokens or set think_budget=0")
    return fits, wanted is not None


def _largest_fitting_budget(room: int, config: WatchdogConfig) -> int:
    """The largest budget B with B + grace(B) <= room (0 if none)."""
    if room <= 0:
        return 0
    budget = max(room - config.grace_max, int(room / (1.0 + config.grace_fraction)))
    while budget > 0 and budget + grace_tokens(budget, config) > room:
        budget -= 1
    while budget + 1 + grace_tokens(budget + 1, config) <= room:
        budget += 1
    return budget
