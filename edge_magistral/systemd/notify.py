"""sd_notify: READY, STATUS, STOPPING and the liveness pings
(``WATCHDOG=1``) that systemd's ``WatchdogSec=`` expects.

One datagram per message to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace),
so it needs no libsystemd. Everything here is a no-op when the process is not run by systemd, and
a send never raises into the server: a notification is best-effort, and the server must keep
answering requests if systemd's socket goes away.

Liveness is what turns a hung GPU call into a restart: the server's supervisor pings only while
the engine worker beats and makes progress (or is idle); when a llama.cpp call never returns the
pings stop, and after ``WatchdogSec=`` systemd kills and restarts the unit.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 2.0  # a wedged systemd must not wedge the server


@dataclass
class Notifier:
    """Sends sd_notify messages; inert when ``address`` is None (not started by systemd).

    Every method returns True when the datagram was sent. Failures are logged once (then at
    debug level) and never raised.
    """

    address: str | None = None  # $NOTIFY_SOCKET as given: "/run/systemd/notify" or "@name"
    watchdog_usec: int | None = None  # $WATCHDOG_USEC (WatchdogSec=), when meant for this process
    _warned: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, unset_environment: bool = False) -> Notifier:
        """Read $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID.

        ``unset_environment`` removes them from ``os.environ`` so that child processes (the
        engine worker) do not think the notifications are theirs.
        """
        env = os.environ if environ is None else environ
        address = _valid_address(env.get("NOTIFY_SOCKET", ""))
        usec = _liveness_usec(env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", ""))
        if unset_environment:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def liveness_interval_s(self) -> float | None:
        """The longest gap between liveness pings systemd advises: half of ``WatchdogSec=``; None
        when systemd expects no pings."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        """The model is loaded and warmed up: systemd marks the unit started."""
        return self.notify("READY=1", *_status_field(status))

    def status(self, text: str) -> bool:
        """A one-line state shown by ``systemctl status``."""
        return self.notify(*_status_field(text))

    def ping_liveness(self) -> bool:
        """``WATCHDOG=1``: the service is alive; withheld, systemd restarts it after ``WatchdogSec=``."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun (draining requests)."""
        return self.notify("STOPPING=1", *_status_field(status))

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` as one datagram (newline-separated ``KEY=value`` lines)."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(SEND_TIMEOUT_S)
                s.sendto("\n".join(fields).encode("utf-8", "replace"), _sockaddr(self.address))
            return True
        except OSError as e:
            self._failed(e)
            return False

    def _failed(self, e: OSError) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        log.log(level, "sd_notify to %s failed: %s (further failures logged at debug level)", self.address, e)
        self._warned = True


def _valid_address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("/") or (raw.startswith("@") and len(raw) > 1):
        return raw
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor an @abstract name", raw)
    return None


def _liveness_usec(usec: str, pid: str) -> int | None:
    """``WatchdogSec=`` in microseconds, if it is meant for this process (systemd sets WATCHDOG_PID to the main PID)."""
    if not usec:
        return None
    if pid and pid.strip() != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value if value > 0 else None


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _status_field(text: str | None) -> tuple[str, ...]:
    """``STATUS=`` with newlines flattened: a newline would start a new (forged) field."""
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.splitlines()),)
