"""Rate-limiting repetitive log lines (a log flood must not fill the disk).

A crash loop, a client hammering a bad request, or llama.cpp repeating one warning per token can
write the same line thousands of times a second. :class:`RateLimitFilter` lets ``burst`` similar
records per logger through in each ``interval_s`` window, drops the rest, and, when the window is
over, says how many it dropped in one line. "Similar" ignores digits, so "slot 3 failed after
12 ms" and "slot 4 failed after 9 ms" are one kind of line; the key uses the formatted message
because llama.cpp's lines all share the template ``"%s"``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_DIGITS = re.compile(r"\d+")
_SUMMARY = "_rate_limit_summary"  # marks our own summary records, which always pass
_DECIDED = "_rate_limit_allowed"  # a record seen by several handlers is counted once


@dataclass
class _Window:
    start: float
    seen: int = 0
    suppressed: int = 0
    level: int = logging.INFO
    sample: str = ""


class RateLimitFilter(logging.Filter):
    """At most ``burst`` similar records per logger per ``interval_s``; then one summary line.
    At most ``max_keys`` kinds of line are tracked (the oldest are forgotten), so memory stays
    bounded whatever the log says."""

    def __init__(self, burst: int = 20, interval_s: float = 10.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.interval_s, self.max_keys, self.clock = burst, interval_s, max_keys, clock
        self._windows: dict[tuple[str, int, str], _Window] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        if hasattr(record, _DECIDED):
            return getattr(record, _DECIDED)
        now = self.clock()
        key = (record.name, record.levelno, _DIGITS.sub("#", record.getMessage()))
        with self._lock:
            ended = self._sweep(now)
            w = self._windows.get(key)
            if w is not None and now - w.start >= self.interval_s:  # its window is over: a new one
                del self._windows[key]
                ended += [(record.name, w)] if w.suppressed else []
                w = None
            if w is None:
                w = self._windows[key] = _Window(now)
                self._forget_oldest()
            w.seen += 1
            allowed = w.seen <= self.burst
            if not allowed:
                w.suppressed += 1
                w.level, w.sample = record.levelno, record.getMessage()
        setattr(record, _DECIDED, allowed)
        for name, window in ended:
            _summarize(name, window, self.interval_s)
        return allowed

    def _sweep(self, now: float) -> list[tuple[str, _Window]]:
        """Close the windows that are over (at most once per interval); those that dropped lines
        are returned for their summary."""
        if now - self._swept < self.interval_s:
            return []
        self._swept = now
        over = [k for k, w in self._windows.items() if now - w.start >= self.interval_s]
        ended = [(k[0], self._windows.pop(k)) for k in over]
        return [(name, w) for name, w in ended if w.suppressed]

    def _forget_oldest(self) -> None:
        while len(self._windows) > self.max_keys:
            self._windows.pop(next(iter(self._windows)))


def _summarize(name: str, w: _Window, interval_s: float) -> None:
    """One line for a window's dropped records, on the logger that wrote them."""
    logging.getLogger(name).log(w.level, "suppressed %d similar messages in %.0f s, the last: %s",
                                w.suppressed, interval_s, w.sample, extra={_SUMMARY: True})


def install(logger_names: Iterable[str] = ("",), limiter: RateLimitFilter | None = None) -> RateLimitFilter:
    """Add one limiter to every handler of these loggers (a filter on a handler sees the records
    that propagate from child loggers too, such as llama.cpp's ``llama_cpp.native``)."""
    limiter = limiter or RateLimitFilter()
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if limiter not in handler.filters:
                handler.addFilter(limiter)
    return limiter
