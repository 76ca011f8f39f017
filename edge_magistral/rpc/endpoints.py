"""Worker addresses: parsing, which networks a head may reach a worker on, and the cluster file.

llama.cpp's RPC has no authentication and no encryption: whoever reaches a worker's port can make
it run code. So a head accepts only workers on loopback, private or link-local addresses unless the
user says the network is theirs alone (``--allow-public-worker`` or ``allow_public: true``).

llama.cpp's RPC client connects over IPv4 only (``gethostbyname``, ``AF_INET``), so an IPv6
address parses and is checked here but is refused for a cluster with a message, instead of
llama.cpp aborting on it.

The cluster file (YAML)::

    workers:
      - address: 10.0.0.2:50052
        link_mbit: 1000      # optional: the link's bandwidth, for the planner
        latency_ms: 0.3      # optional: one-way latency
        layers: 20           # optional: pin this many layers here (default: the planner decides)
      - address: 10.0.0.3
    allow_public: false     # optional
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_magistral.errors import BadInputError

DEFAULT_PORT = 50052
MAX_WORKERS = 16  # GGML_RPC_MAX_SERVERS in llama.cpp's ggml-rpc.h

_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")

# Where a worker may be without --allow-public-worker. 100.64.0.0/10 (carrier-grade NAT) is here
# because Tailscale gives its nodes addresses there, and Tailscale (like WireGuard) encrypts and
# authenticates every packet: the tunnel supplies what llama.cpp's RPC lacks.
_ALLOWED_NETS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8", "::1/128",  # loopback
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "100.64.0.0/10",  # CGNAT / Tailscale (see above)
        "fc00::/7",  # IPv6 unique local addresses
        "169.254.0.0/16", "fe80::/10",  # link-local (a direct cable)
    )
)

PUBLIC_ADVICE = (
    "llama.cpp's RPC has no authentication or encryption and anyone who reaches it can run code there; "
    "use a direct cable, a VLAN, WireGuard or an SSH forward, or pass --allow-public-worker if that "
    "network is yours alone"
)


@dataclass(frozen=True)
class Endpoint:
    """A worker's address; ``str()`` is what llama.cpp and the probe are given."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise BadInputError(f"worker address {whole!r} has a bad port {text!r}: give a port from 1 to 65535")
    return int(text)


def _v6(text: str, whole: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise BadInputError(f"worker address {whole!r} is not a valid IPv6 address in brackets: "
                            "write it as [addr]:port") from None


def parse_endpoint(text: str, default_port: int = DEFAULT_PORT) -> Endpoint:
    """``host``, ``host:port`` or ``[v6addr]:port`` (a bare IPv6 address takes the default port)."""
    whole = text.strip()
    if whole.startswith("["):
        addr, sep, rest = whole[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BadInputError(f"worker address {text!r} is malformed: write an IPv6 address as [addr]:port")
        return Endpoint(_v6(addr, text), _port(rest[1:], text) if rest else default_port)
    if whole.count(":") > 1:
        return Endpoint(_v6(whole, text), default_port)
    host, sep, port = whole.partition(":")
    if not _HOSTNAME.match(host):
        raise BadInputError(f"worker address {text!r} has no valid host: give host, host:port or [v6addr]:port")
    return Endpoint(host, _port(port, text) if sep else default_port)


def _address_allowed(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in _ALLOWED_NETS if net.version == addr.version)


def resolve(ep: Endpoint) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address the host resolves to (a literal resolves to itself, without DNS)."""
    try:
        infos = socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise BadInputError(f"worker {ep}: cannot resolve {ep.host!r} ({e}): check the name, "
                            "or give the worker's IP address") from None
    out = []
    for info in infos:
        a = ipaddress.ip_address(str(info[4][0]).partition("%")[0])  # drop an IPv6 scope (%eth0)
        if a not in out:
            out.append(a)
    return out


def check_allowed(ep: Endpoint, allow_public: bool) -> None:
    """Refuse a worker that resolves to any address outside loopback, private and link-local
    networks (unless ``allow_public``): llama.cpp's RPC lets anyone who reaches it run code."""
    addrs = resolve(ep)
    if any(a.is_unspecified for a in addrs):
        raise BadInputError(f"worker {ep} names no host (0.0.0.0 or ::): give the worker's own address")
    if allow_public:
        return
    public = [a for a in addrs if not _address_allowed(a)]
    if public:
        via = "" if str(public[0]) == ep.host else f" ({public[0]})"
        raise BadInputError(f"worker {ep} is on a public address{via}: {PUBLIC_ADVICE}")


# ------------------------------------------------------------------------------ the cluster file


@dataclass(frozen=True)
class WorkerSpec:
    """One worker and, when the cluster file states them, its link's bandwidth and latency."""

    endpoint: Endpoint
    link_mbit: float | None = None
    latency_ms: float | None = None
    layers: int | None = None  # pin this many repeating layers here (None: the planner decides)


@dataclass(frozen=True)
class Cluster:
    """The workers a head places layers on, in llama.cpp's device order."""

    workers: tuple[WorkerSpec, ...] = ()
    allow_public: bool = False

    @property
    def endpoints(self) -> list[str]:
        return [str(w.endpoint) for w in self.workers]


_WORKER_KEYS = {"address", "link_mbit", "latency_ms", "layers"}
_TOP_KEYS = {"workers", "allow_public"}


def _number(entry: dict, key: str, where: str, minimum_exclusive: bool) -> float | None:
    v = entry.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (minimum_exclusive and v == 0):
        bound = "a number above 0" if minimum_exclusive else "a number, 0 or more"
        raise BadInputError(f"{where}: {key} must be {bound}, not {v!r}")
    return float(v)


def _known_keys(mapping: dict, known: set[str], where: str) -> None:
    """Refuse the first key the cluster file does not define (a typo would be silently ignored)."""
    unknown = sorted(set(map(str, mapping)) - known)
    if unknown:
        raise BadInputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _worker_spec(entry: Any, where: str) -> WorkerSpec:
    if isinstance(entry, str):
        entry = {"address": entry}
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: each worker must be a mapping with an address, not {entry!r}")
    _known_keys(entry, _WORKER_KEYS, where)
    address = entry.get("address")
    if not isinstance(address, str):
        raise BadInputError(f"{where}: a worker needs an address (host:port), got {address!r}")
    try:
        ep = parse_endpoint(address)
    except BadInputError as e:
        raise BadInputError(f"{where}: {e}") from None
    layers = entry.get("layers")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise BadInputError(f"{where}: layers must be a whole number, 0 or more, not {layers!r}")
    return WorkerSpec(ep, _number(entry, "link_mbit", where, True), _number(entry, "latency_ms", where, False),
                      layers)


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"cluster file {path} does not exist: check the path given to --cluster") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cluster file {path} cannot be read ({e}): check the file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise BadInputError(f"cluster file {path} is not valid YAML{at}: fix its syntax") from None


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster file (addresses are parsed here; ``cluster_from`` checks where
    they are)."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise BadInputError(f"cluster file {path} must be a mapping with a 'workers' list")
    _known_keys(data, _TOP_KEYS, f"cluster file {path}")
    workers = data.get("workers")
    if not isinstance(workers, list) or not workers:
        raise BadInputError(f"cluster file {path} lists no workers: add 'workers:' with at least one address")
    allow = data.get("allow_public", False)
    if not isinstance(allow, bool):
        raise BadInputError(f"cluster file {path}: allow_public must be true or false, not {allow!r}")
    specs = tuple(_worker_spec(w, f"cluster file {path}, worker {i + 1}") for i, w in enumerate(workers))
    _check_count(specs, f"cluster file {path}")
    return Cluster(specs, allow)


def _check_count(specs: Sequence[WorkerSpec], where: str) -> None:
    seen: set[str] = set()
    for s in specs:
        if str(s.endpoint) in seen:
            raise BadInputError(f"{where}: worker {s.endpoint} is listed twice: list each worker once")
        seen.add(str(s.endpoint))
    if len(specs) > MAX_WORKERS:
        raise BadInputError(f"{where}: {len(specs)} workers, llama.cpp's RPC takes at most {MAX_WORKERS}: "
                            "use fewer workers")


def cluster_from(workers: Sequence[str], cluster_file: str | None, allow_public: bool) -> Cluster:
    """The CLI's ``--worker`` addresses and ``--cluster`` file as one cluster: the file's workers
    first, then each ``--worker`` in order (that order is llama.cpp's device order). Each address
    must be IPv4 (llama.cpp's client) and allowed (``check_allowed``)."""
    base = load_cluster(cluster_file) if cluster_file else Cluster()
    specs = base.workers + tuple(WorkerSpec(parse_endpoint(w)) for w in workers)
    allow = allow_public or base.allow_public
    _check_count(specs, "workers")
    for s in specs:
        if s.endpoint.is_ipv6:
            raise BadInputError(f"worker {s.endpoint}: llama.cpp's RPC client connects over IPv4 only: "
                                "give the worker's IPv4 address or a name that resolves to one")
        check_allowed(s.endpoint, allow)
    return Cluster(specs, allow)


def cluster_yaml(cluster: Cluster) -> str:
    """The cluster as a file ``load_cluster`` reads back the same (``install-service`` writes one
    beside the service's config)."""
    import yaml

    def entry(w: WorkerSpec) -> dict[str, Any]:
        d: dict[str, Any] = {"address": str(w.endpoint)}
        for key in ("link_mbit", "latency_ms", "layers"):
            if (v := getattr(w, key)) is not None:
                d[key] = v
        return d

    body = {"workers": [entry(w) for w in cluster.workers], "allow_public": cluster.allow_public}
    return "# RPC workers of the edge-magistral service, in llama.cpp's device order.\n" + yaml.safe_dump(
        body, sort_keys=False)


def worker_ips(cluster: Cluster) -> list[str]:
    """Every address the workers' names resolve to, for a firewall rule (``IPAddressAllow=``)."""
    return sorted({str(a) for w in cluster.workers for a in resolve(w.endpoint)})

