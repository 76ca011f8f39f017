"""Worker addresses, the allow-list of networks, and the cluster file (offline: literal IPs only,
and ``localhost``)."""

from __future__ import annotations

import socket

import pytest

from edge_magistral.errors import BadInputError
from edge_magistral.rpc.endpoints import (
    MAX_WORKERS,
    Cluster,
    Endpoint,
    WorkerSpec,
    check_allowed,
    cluster_from,
    load_cluster,
    parse_endpoint,
)

# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("text, host, port, shown", [
    ("10.0.0.2:50052", "10.0.0.2", 50052, "10.0.0.2:50052"),
    ("10.0.0.2", "10.0.0.2", 50052, "10.0.0.2:50052"),
    (" box-1.lan:7000 ", "box-1.lan", 7000, "box-1.lan:7000"),
    ("localhost:1", "localhost", 1, "localhost:1"),
    ("[::1]:65535", "::1", 65535, "[::1]:65535"),
    ("[fd00:0::2]", "fd00::2", 50052, "[fd00::2]:50052"),
    ("fe80::1", "fe80::1", 50052, "[fe80::1]:50052"),
])
def test_parse_endpoint(text, host, port, shown):
    ep = parse_endpoint(text)
    assert ep == Endpoint(host, port)
    assert str(ep) == shown
    assert parse_endpoint(shown) == ep


def test_parse_endpoint_default_port():
    assert parse_endpoint("10.0.0.9", default_port=1234) == Endpoint("10.0.0.9", 1234)


@pytest.mark.parametrize("text, words", [
    ("10.0.0.2:0", "bad port '0'"),
    ("10.0.0.2:65536", "bad port '65536'"),
    ("10.0.0.2:-1", "bad port '-1'"),
    ("10.0.0.2:http", "bad port 'http'"),
    ("10.0.0.2:", "bad port ''"),
    ("", "no valid host"),
    (":50052", "no valid host"),
    ("bad host:1", "no valid host"),
    ("[::1", "malformed"),
    ("[::1]50052", "malformed"),
    ("[not-v6]:1", "not a valid IPv6"),
    ("1:2:zz", "not a valid IPv6"),
    ("[::1]:99999", "bad port"),
])
def test_parse_endpoint_refuses(text, words):
    with pytest.raises(BadInputError) as e:
        parse_endpoint(text)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------ allowed networks


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.3.4.5", "::1", "localhost",
    "10.0.0.2", "10.255.255.254", "172.16.0.1", "172.31.255.1", "192.168.1.20",
    "100.64.0.1", "100.127.255.254",  # CGNAT / Tailscale
    "169.254.10.10", "fe80::1", "fd12:3456::1", "fc00::1",
    "::ffff:10.0.0.1",  # IPv4-mapped
])
def test_private_addresses_allowed(host):
    check_allowed(Endpoint(host, 50052), allow_public=False)


@pytest.mark.parametrize("host", ["8.8.8.8", "172.32.0.1", "192.169.0.1", "100.128.0.1", "11.0.0.1",
                                  "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_refused(host):
    with pytest.raises(BadInputError, match="is on a public address"):
        check_allowed(Endpoint(host, 50052), allow_public=False)
    check_allowed(Endpoint(host, 50052), allow_public=True)


def test_public_message_says_what_to_do():
    with pytest.raises(BadInputError) as e:
        check_allowed(Endpoint("8.8.8.8", 50052), allow_public=False)
    assert str(e.value) == (
        "worker 8.8.8.8:50052 is on a public address: llama.cpp's RPC has no authentication or encryption "
        "and anyone who reaches it can run code there; use a direct cable, a VLAN, WireGuard or an SSH "
        "forward, or pass --allow-public-worker if that network is yours alone")


def test_unspecified_address_refused_even_when_public_allowed():
    for host in ("0.0.0.0", "::"):
        with pytest.raises(BadInputError, match="names no host"):
            check_allowed(Endpoint(host, 50052), allow_public=True)


def test_unresolvable_name(monkeypatch):
    # A real lookup would need DNS (offline tests): the resolver's failure is what is simulated.
    def fail(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(BadInputError, match=r"worker nowhere\.lan:50052: cannot resolve 'nowhere\.lan'"):
        check_allowed(Endpoint("nowhere.lan", 50052), allow_public=True)


def test_name_resolving_to_public_address_names_it(monkeypatch):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("8.8.4.4", *a, **k))
    with pytest.raises(BadInputError, match=r"worker dns\.example:50052 is on a public address \(8\.8\.4\.4\)"):
        check_allowed(Endpoint("dns.example", 50052), allow_public=False)


# ------------------------------------------------------------------------------ the cluster file


def _file(tmp_path, text: str):
    p = tmp_path / "cluster.yaml"
    p.write_text(text, encoding="utf-8")
    return p


GOOD = """\
workers:
  - address: 10.0.0.2:50052
    link_mbit: 1000      # the link's bandwidth
    latency_ms: 0.3
  - address: 10.0.0.3
  - 192.168.1.7:6000
allow_public: false
"""


def test_load_cluster(tmp_path):
    c = load_cluster(_file(tmp_path, GOOD))
    assert c == Cluster((WorkerSpec(Endpoint("10.0.0.2", 50052), 1000.0, 0.3),
                         WorkerSpec(Endpoint("10.0.0.3", 50052)),
                         WorkerSpec(Endpoint("192.168.1.7", 6000))), False)
    assert c.endpoints == ["10.0.0.2:50052", "10.0.0.3:50052", "192.168.1.7:6000"]


@pytest.mark.parametrize("text, words", [
    ("workers: [\n", "is not valid YAML at line 2"),
    ("- 10.0.0.2\n", "must be a mapping with a 'workers' list"),
    ("", "must be a mapping"),
    ("workers: []\n", "lists no workers"),
    ("allow_public: true\n", "lists no workers"),
    ("workers: 10.0.0.2\n", "lists no workers"),
    ("workers: [10.0.0.2]\nport: 1\n", "unknown key 'port'"),
    ("workers:\n  - address: 10.0.0.2\n    bandwidth: 1\n", "worker 1: unknown key 'bandwidth'"),
    ("workers:\n  - link_mbit: 100\n", "worker 1: a worker needs an address"),
    ("workers:\n  - address: 10\n", "worker 1: a worker needs an address"),
    ("workers:\n  - 10.0.0.2\n  - 42\n", "worker 2: each worker must be a mapping"),
    ("workers:\n  - address: 10.0.0.2:99999\n", "worker 1: worker address '10.0.0.2:99999' has a bad port"),
    ("workers:\n  - address: 10.0.0.2\n    link_mbit: fast\n", "link_mbit must be a number above 0, not 'fast'"),
    ("workers:\n  - address: 10.0.0.2\n    link_mbit: 0\n", "link_mbit must be a number above 0"),
    ("workers:\n  - address: 10.0.0.2\n    link_mbit: true\n", "link_mbit must be a number above 0"),
    ("workers:\n  - address: 10.0.0.2\n    latency_ms: -1\n", "latency_ms must be a number, 0 or more"),
    ("workers: [10.0.0.2]\nallow_public: 'yes'\n", "allow_public must be true or false, not 'yes'"),
    ("workers: [10.0.0.2, '10.0.0.2:50052']\n", "worker 10.0.0.2:50052 is listed twice"),
])
def test_load_cluster_refuses(tmp_path, text, words):
    p = _file(tmp_path, text)
    with pytest.raises(BadInputError) as e:
        load_cluster(p)
    msg = str(e.value)
    assert words in msg
    assert str(p) in msg
    assert "\n" not in msg


def test_load_cluster_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_cluster(tmp_path / "nope.yaml")


def test_load_cluster_too_many_workers(tmp_path):
    lines = "".join(f"  - 10.0.0.{i + 1}\n" for i in range(MAX_WORKERS + 1))
    with pytest.raises(BadInputError, match=f"{MAX_WORKERS + 1} workers, llama.cpp's RPC takes at most 16"):
        load_cluster(_file(tmp_path, "workers:\n" + lines))


def test_cluster_from_flags_and_file(tmp_path):
    c = cluster_from(["127.0.0.1:7000", "localhost"], str(_file(tmp_path, GOOD)), False)
    assert c.endpoints == ["10.0.0.2:50052", "10.0.0.3:50052", "192.168.1.7:6000",
                           "127.0.0.1:7000", "localhost:50052"]
    assert c.workers[0].link_mbit == 1000.0 and c.workers[3].link_mbit is None
    assert cluster_from(["10.0.0.5"], None, False) == Cluster((WorkerSpec(Endpoint("10.0.0.5", 50052)),))
    assert cluster_from([], None, False) == Cluster()


def test_cluster_from_refuses_duplicates(tmp_path):
    with pytest.raises(BadInputError, match="worker 10.0.0.2:50052 is listed twice"):
        cluster_from(["10.0.0.2:50052", "10.0.0.2"], None, False)
    with pytest.raises(BadInputError, match="worker 10.0.0.3:50052 is listed twice"):
        cluster_from(["10.0.0.3"], str(_file(tmp_path, GOOD)), False)


def test_cluster_from_at_most_16():
    ok = [f"10.0.0.{i + 1}" for i in range(MAX_WORKERS)]
    assert len(cluster_from(ok, None, False).workers) == MAX_WORKERS
    with pytest.raises(BadInputError, match="17 workers"):
        cluster_from([*ok, "10.0.1.1"], None, False)


def test_cluster_from_public_worker(tmp_path):
    with pytest.raises(BadInputError, match="worker 8.8.8.8:50052 is on a public address"):
        cluster_from(["10.0.0.2", "8.8.8.8"], None, False)
    assert cluster_from(["8.8.8.8"], None, True).allow_public
    allowing = _file(tmp_path, "workers: [10.0.0.2]\nallow_public: true\n")
    c = cluster_from(["8.8.8.8"], str(allowing), False)
    assert c.allow_public and c.endpoints == ["10.0.0.2:50052", "8.8.8.8:50052"]


def test_cluster_from_refuses_ipv6():
    # llama.cpp's RPC client connects over IPv4 only: it would abort on this address.
    with pytest.raises(BadInputError, match=r"worker \[fd00::2\]:50052: llama.cpp's RPC client connects over IPv4"):
        cluster_from(["[fd00::2]:50052"], None, False)


def test_cluster_from_bad_address():
    with pytest.raises(BadInputError, match="bad port"):
        cluster_from(["10.0.0.2:0"], None, False)
