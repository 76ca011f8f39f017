"""The ``rpc-worker`` supervisor: llama.cpp's RPC server in a child process, behind the relay.

llama.cpp's server blocks forever inside C and aborts its process on some errors, so it runs in a
child (``python -m edge_magistral.rpc.worker SPEC``) on a loopback port of its own, restarted with
a backoff when it ends. The supervisor never loads llama.cpp: the child prints the devices it
serves as one JSON line before serving, and ``detect()`` asks llama.cpp in a child of its own.
The public port is the relay's (:mod:`.relay`): the allow-list, one head at a time, ``GET /info``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from edge_magistral import __version__
from edge_magistral.errors import BadInputError, StorageError
from edge_magistral.hosts import is_loopback
from edge_magistral.paths import child_env, default_store_root
from edge_magistral.rpc.endpoints import Endpoint, parse_endpoint
from edge_magistral.rpc.relay import Relay

log = logging.getLogger(__name__)
child_log = logging.getLogger(__name__ + ".child")

DEFAULT_BIND = "127.0.0.1:50052"
PROTOCOL = "7.0.0"  # probe.PROTO_VERSION, the protocol of the installed llama.cpp
DEVICES_LINE = "EDGE_MAGISTRAL_RPC_DEVICES "  # the child's first line of its own
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0  # a child that ran this long restarts after the shortest backoff again
DETECT_EVERY_S = 10.0
# llama.cpp's client hangs up and reconnects between calls (its connection is a weak_ptr), so a
# HELLO that arrives while the previous head's connection is closing waits this long for it.
CLAIM_GRACE_S = 2.0
KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
SECURITY = ("llama.cpp's RPC has no authentication: anyone who reaches the port can run code on this box")


def default_cache_dir() -> str:
    """Where llama.cpp keeps tensors a head sent, so the next load skips re-sending them."""
    return str(default_store_root() / "rpc-cache")


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)  # llama.cpp's rpc-server default


@dataclass(frozen=True)
class WorkerConfig:
    """What ``rpc-worker`` was asked to do."""

    bind: str = DEFAULT_BIND
    allow: tuple[str, ...] = ()
    use_cpu: bool = False
    threads: int = 1
    cache_dir: str | None = None  # None: no cache


# ------------------------------------------------------------------------------ policy


def parse_allow(allow: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The heads' addresses (an IP or a CIDR network each); refuses a name and a network of everyone."""
    nets = []
    for a in allow:
        try:
            net = ipaddress.ip_network(a.strip(), strict=False)
        except ValueError:
            raise BadInputError(f"--allow {a!r} is not an IP address or network: give the head's IP "
                                "(e.g. 10.0.0.1) or a CIDR (e.g. 10.0.0.0/24)") from None
        if net.prefixlen == 0:
            raise BadInputError(f"--allow {a} lets every address in ({SECURITY}): give the head's IP")
        nets.append(net)
    return nets


def check_bind(bind: str, allow: Sequence[str]) -> Endpoint:
    """The address to listen on; a non-loopback one needs the heads named (``--allow``)."""
    ep = parse_endpoint(bind)
    parse_allow(allow)
    if not is_loopback(ep.host) and not allow:
        raise BadInputError(f"--bind {ep} is reachable from the network and {SECURITY}: pass --allow HEAD_IP "
                            "(and reach it over a direct cable, a VLAN, WireGuard or an SSH forward)")
    return ep


def peer_allowed(peer_ip: str, allow: Sequence[str], bind_host: str) -> bool:
    """Loopback peers always; with a loopback bind only local peers can connect at all; else only
    the heads in ``allow``."""
    try:
        ip = ipaddress.ip_address(peer_ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or is_loopback(bind_host):
        return True
    return any(ip in net for net in parse_allow(allow) if net.version == ip.version)


def next_backoff(delay: float, ran_s: float) -> tuple[float, float]:
    """(this wait, the next one): 1 s, 2 s, 4 s … capped at 30 s; back to 1 s after a stable run."""
    if ran_s >= STABLE_AFTER_S:
        delay = 1.0
    return delay, min(delay * 2, BACKOFF_MAX_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the supervisor


class Supervisor:
    """The child server's life (start, ready, restart) and the state ``/info`` publishes."""

    def __init__(self, config: WorkerConfig, detect_fn: Callable[[], dict] | None = None) -> None:
        self.config = config
        self.bind = check_bind(config.bind, config.allow)
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._internal: str | None = None
        self._ready = False
        self._client: str | None = None
        self._devices: list[dict] = []
        self._state = "starting"
        self.restarts = 0
        self.bytes_to_worker = 0
        self.bytes_from_worker = 0
        self._detect_fn = detect_fn or _detect_json
        self._detect: dict | None = None
        self._detected_at = 0.0
        self._detecting = False

    # ---- what the relay asks

    def peer_allowed(self, ip: str) -> bool:
        return peer_allowed(ip, self.config.allow, self.bind.host)

    def claim(self, peer: str) -> str | None:
        with self._cond:
            free = self._cond.wait_for(lambda: (self._ready and self._client is None) or self.stop.is_set(),
                                       CLAIM_GRACE_S)
            if not free or self.stop.is_set():
                return None
            self._client = peer
            self._state = "serving"
            return self._internal

    def release(self) -> None:
        with self._cond:
            self._client = None
            if self._state == "serving":
                self._state = "idle"
            self._cond.notify_all()

    def count(self, to_worker: int, from_worker: int) -> None:
        with self._cond:
            self.bytes_to_worker += to_worker
            self.bytes_from_worker += from_worker

    def info(self) -> dict:
        self._refresh_detect()
        with self._cond:
            return {
                "service": "edge-magistral rpc-worker",
                "version": __version__,
                "protocol": PROTOCOL,
                "bind": str(self.bind),
                "devices": list(self._devices),
                "detect": self._detect,
                "state": self._state,
                "client": self._client,
                "restarts": self.restarts,
                "bytes_to_worker": self.bytes_to_worker,
                "bytes_from_worker": self.bytes_from_worker,
                "child_pid": self._proc.pid if self._proc is not None and self._proc.poll() is None else None,
            }

    # ---- detect(), at start and at most every DETECT_EVERY_S when asked

    def detect_now(self) -> None:
        """Run ``detect()`` (a second or two: it asks llama.cpp in a child); a failure keeps the last."""
        try:
            d = self._detect_fn()
        except Exception as e:  # a probe that broke must not take the worker with it
            log.warning("detect failed: %s", e)
            d = self._detect
        with self._cond:
            self._detect, self._detected_at, self._detecting = d, time.monotonic(), False

    def _refresh_detect(self) -> None:
        with self._cond:
            if self._detecting or time.monotonic() - self._detected_at < DETECT_EVERY_S:
                return
            self._detecting = True
        threading.Thread(target=self.detect_now, daemon=True, name="rpc-detect").start()

    # ---- the child

    def keep_child(self) -> None:
        """Run the child until ``stop``; restart it with a backoff whenever it ends."""
        delay = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            proc = self._start_child()
            if self._wait_ready(proc):
                self._set(ready=True, state="serving" if self._client else "idle")
            code = proc.wait()
            if self.stop.is_set():
                return
            ran = time.monotonic() - started
            wait, delay = next_backoff(delay, ran)
            with self._cond:
                self.restarts += 1
            self._set(ready=False, state="restarting")
            log.warning("llama.cpp's RPC server ended (%s) after %.0f s; restarting in %.0f s",
                        _how(code), ran, wait)
            self.stop.wait(wait)

    def _set(self, ready: bool, state: str) -> None:
        with self._cond:
            self._ready = ready
            self._state = state
            self._cond.notify_all()

    def _start_child(self) -> subprocess.Popen:
        internal = f"127.0.0.1:{free_port()}"
        spec = {"endpoint": internal, "cache_dir": self.config.cache_dir, "threads": self.config.threads,
                "use_cpu": self.config.use_cpu}
        proc = subprocess.Popen([sys.executable, "-m", "edge_magistral.rpc.worker", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=child_env())
        with self._cond:
            self._proc, self._internal = proc, internal
        if self.stop.is_set():  # shutdown() ran while this child was starting: it saw the old one
            proc.terminate()
        threading.Thread(target=self._read_output, args=(proc,), daemon=True, name="rpc-child-log").start()
        log.info("started llama.cpp's RPC server (pid %d) on %s", proc.pid, internal)
        return proc

    def _read_output(self, proc: subprocess.Popen) -> None:
        """The child's output into our log; its devices line into ``/info``."""
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line.startswith(DEVICES_LINE):
                with self._cond:
                    self._devices = [_device_entry(d) for d in json.loads(line[len(DEVICES_LINE):])]
                    self._cond.notify_all()
            elif line:
                child_log.info("%s", line)

    def _wait_ready(self, proc: subprocess.Popen) -> bool:
        """Until the child's server answers HELLO (it exited or we stop: False)."""
        from edge_magistral.rpc.probe import WorkerError, probe

        while not self.stop.is_set() and proc.poll() is None:
            try:
                probe(self._internal or "", timeout_s=5.0)
                return True
            except WorkerError:
                self.stop.wait(0.1)
        return False

    def shutdown(self) -> None:
        """Stop everything: the relay (through ``stop``) and the child (SIGTERM, then SIGKILL)."""
        self.stop.set()
        with self._cond:
            proc = self._proc
            self._cond.notify_all()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _device_entry(d: dict) -> dict:
    return {"name": d["name"], "description": d["description"], "kind": KINDS.get(d["kind"], "unknown"),
            "free_bytes": d["free_bytes"], "total_bytes": d["total_bytes"]}


def _how(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit status {code}"


def _detect_json() -> dict:
    from edge_magistral.hardware import detect

    return json.loads(detect().to_json())


# ------------------------------------------------------------------------------ the command


def _listen(ep: Endpoint) -> socket.socket:
    family = socket.AF_INET6 if ep.is_ipv6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ep.host, ep.port))
    except OSError as e:
        s.close()
        raise BadInputError(f"cannot listen on {ep}: {e.strerror or e}: choose another --bind") from None
    s.listen(16)
    return s


def _prepare_cache(cache_dir: str | None) -> None:
    if cache_dir is None:
        return
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create the cache directory {cache_dir}: {e.strerror or e}: "
                           "pass --cache-dir DIR or --no-cache") from None


def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then stop the child and return."""
    sup = Supervisor(config)
    _prepare_cache(config.cache_dir)
    listener = _listen(sup.bind)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sup.stop.set())
    sup.detect_now()
    keeper = threading.Thread(target=sup.keep_child, daemon=True, name="rpc-child")
    keeper.start()
    relay = Relay(listener, sup, sup.stop)
    relay_thread = threading.Thread(target=relay.serve, daemon=True, name="rpc-relay")
    relay_thread.start()
    log.warning("rpc-worker on %s (allow: %s; cache: %s)", sup.bind, ", ".join(config.allow) or "loopback",
                config.cache_dir or "none")
    while not sup.stop.wait(1.0):
        pass
    log.warning("stopping")
    sup.shutdown()
    relay_thread.join(5)
    keeper.join(5)


# ------------------------------------------------------------------------------ the child


def _exit_when_orphaned() -> None:
    """The supervisor holds our stdin; its end (even a SIGKILL) ends us."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def child_main(spec: dict) -> int:
    """Print the devices this box serves (one line), then serve them until killed."""
    from edge_magistral.errors import BackendError
    from edge_magistral.rpc import backend

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    threading.Thread(target=_exit_when_orphaned, daemon=True).start()
    try:
        devices = backend.serve_devices(spec["use_cpu"])
        print(DEVICES_LINE + json.dumps([asdict(d) for d in devices]), flush=True)
        backend.serve_forever(spec["endpoint"], spec["cache_dir"], spec["threads"], devices)
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(child_main(json.loads(sys.argv[1])))
