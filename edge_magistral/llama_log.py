"""One llama.cpp log callback for the whole process, routed to ``logging`` and to listeners.

llama-cpp-python's own callback can raise ``UnicodeDecodeError`` on some model metadata and prints
to stderr; ours decodes with replacement, joins fragments into lines, logs them at DEBUG on the
``llama_cpp.native`` logger (quiet by default), and hands each line to the active listeners — the
quantizer's progress bar and the planner's dry-run capture read llama.cpp's log this way.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("llama_cpp.native")

Listener = Callable[[str], None]
_listeners: list[Listener] = []
_lock = threading.Lock()
_partial: list[str] = []
_installed: object | None = None  # keeps the ctypes callback alive


def _on_log(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
    if not text:
        return
    s = text.decode("utf-8", "replace")
    with _lock:
        _partial.append(s)
        joined = "".join(_partial)
        if "\n" not in joined:
            return
        *lines, rest = joined.split("\n")
        _partial[:] = [rest] if rest else []
        listeners = list(_listeners)
    for line in lines:
        log.debug("%s", line)
        for listener in listeners:
            try:
                listener(line)
            except Exception:  # a listener must never break llama.cpp's call
                log.exception("llama log listener failed")


def install() -> None:
    """Install the callback (idempotent). Imports llama_cpp, so call it only where needed."""
    global _installed
    if _installed is not None:
        return
    import llama_cpp

    cb = llama_cpp.llama_log_callback(_on_log)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    _installed = cb


@contextlib.contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Send every complete llama.cpp log line to ``listener`` while the block runs."""
    install()
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
