#!/usr/bin/env python3
"""A slow link between a head and its RPC workers, measured against the planner (issue 14).

Everything runs inside a network namespace of its own (``unshare -n``; the script re-executes
itself there; root, or ``unshare -rn`` where user namespaces are allowed), whose loopback plays the
link between the boxes:

- **bandwidth**: ``tc`` token-bucket rate limiting (``tbf``) on ``lo`` with an Ethernet MTU (1500).
  Every byte to a worker crosses loopback three times (the delay relay, the rpc-worker's relay, its
  llama.cpp server), all shaped together, so the rate a transfer really gets over those three hops
  is measured (``wire_bandwidth``) and given to the planner;
- **latency**: this kernel's ``tc`` has no ``netem`` (checked at start), so a one-way delay comes
  from a small relay in front of each worker that holds every chunk for the delay in each
  direction (here, in the benchmark; the product has no such thing).

For each link (the unlimited loopback first, the baseline of the same run): two
``edge-magistral rpc-worker`` processes, the model split across them by the planner (the head keeps
the embeddings and the output layer), then: the load time (the first load sends every remote
layer over the link), the time to first token of a ``--prompt-tokens`` prompt, and greedy decoding
speed over ``--gen-tokens``, best of ``--reps``; beside each, the planner's prediction for the
same link (tokens/s with the link's cost, TTFT, first-load bytes ÷ bandwidth) and the measured
cost of the link per token against the predicted one.

    python benchmarks/rpc_link.py --model .cache/test-models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out benchmarks/results/issue14/rpc_link_smollm2.json

Writes JSON (``--out``) and a text table beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IN_NETNS = "EDGE_MAGISTRAL_BENCH_NETNS"


@dataclass(frozen=True)
class LinkSetting:
    name: str
    mbit: float | None  # None: no rate limit
    delay_ms: float  # one way


LINKS = [
    LinkSetting("loopback", None, 0.0),
    LinkSetting("1 Gbit/s, 0.25 ms", 1000, 0.25),
    LinkSetting("100 Mbit/s, 1 ms", 100, 1.0),
    LinkSetting("100 Mbit/s, 5 ms", 100, 5.0),
]


# ------------------------------------------------------------------ the link

def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def set_rate(mbit: float | None) -> None:
    """tbf on loopback: a bucket of 64 KiB (a few packets) drained at ``mbit``."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], stderr=subprocess.DEVNULL)
    if mbit is not None:
        sh("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{mbit}mbit", "burst", "64kb",
           "latency", "200ms")


class DelayRelay:
    """Accepts on ``listen`` and forwards to ``target``, each chunk delivered ``delay_s`` after it
    arrived, in order, in both directions (a link's one-way latency)."""

    def __init__(self, target: tuple[str, int], delay_s: float):
        self.target, self.delay_s = target, delay_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.sock.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            for s in (a, b):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pipe(a, b)
            self._pipe(b, a)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        q: queue.SimpleQueue[tuple[float, bytes]] = queue.SimpleQueue()

        def read() -> None:
            while True:
                try:
                    data = src.recv(1 << 20)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.delay_s, data))
                if not data:
                    return

        def write() -> None:
            while True:
                at, data = q.get()
                if (wait := at - time.monotonic()) > 0:
                    time.sleep(wait)
                try:
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def wire_bandwidth(delay_s: float, nbytes: int = 16 << 20) -> float:
    """Bytes/s a bulk TCP transfer really gets over the shaped loopback and a relay like the
    workers' (tbf's drops and TCP's reaction make it less than the nominal rate): the planner is
    asked with this figure, so what is compared is its model of the link, not tc's accuracy."""
    sink = socket.create_server(("127.0.0.1", 0))

    def drain() -> None:
        conn, _ = sink.accept()
        with conn:
            got = 0
            while got < nbytes:
                got += len(conn.recv(1 << 20))
            conn.sendall(b"k")

    threading.Thread(target=drain, daemon=True).start()
    # the same three loopback hops as every byte to a worker: this delay relay, the rpc-worker's
    # relay, its llama.cpp server (tbf shapes all of loopback's traffic together)
    hop = DelayRelay(sink.getsockname()[:2], 0.0)
    relay = DelayRelay(("127.0.0.1", int(hop.endpoint.rsplit(":", 1)[1])), delay_s)
    try:
        with socket.create_connection(("127.0.0.1", int(relay.endpoint.rsplit(":", 1)[1]))) as c:
            t0 = time.monotonic()
            c.sendall(bytes(nbytes))
            c.recv(1)
            return nbytes / max(1e-9, time.monotonic() - t0 - 2 * delay_s)
    finally:
        relay.close()
        hop.close()
        sink.close()


# ------------------------------------------------------------------ workers

def start_worker(tmp: Path, i: int, threads: int) -> tuple[subprocess.Popen, str]:
    from edge_magistral.rpc.probe import fetch_info
    from edge_magistral.rpc.worker import free_port

    ep = f"127.0.0.1:{free_port()}"
    log = (tmp / f"worker{i}.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "edge_magistral", "rpc-worker", "--bind", ep, "--cache-dir",
                             str(tmp / f"cache{i}"), "--threads", str(threads)], stdout=log, stderr=log)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"rpc-worker {i} exited: {(tmp / f'worker{i}.log').read_text()[-2000:]}")
        try:
            if (fetch_info(ep, 2.0) or {}).get("state") == "idle":
                return proc, ep
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"rpc-worker {i} did not start")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


# ------------------------------------------------------------------ one link

def predicted(plan) -> dict:
    """The planner's figures for this split and link (its ``cluster`` part)."""
    c = plan.to_dict()["cluster"]
    return {k: c.get(k) for k in ("tokens_per_s", "tokens_per_s_no_link", "link_ms_per_token", "ttft_s",
                                  "prompt_tokens", "first_load_bytes", "boundaries", "output_device")} | {
        "workers": [{k: w.get(k) for k in ("endpoint", "layers", "first_load_bytes")} | {
            "memory_total": w["memory"]["total"]} for w in c["workers"]]}


def measure_link(link: LinkSetting, relays: list[DelayRelay], args) -> dict:
    from edge_magistral import loader
    from edge_magistral.generation import Done, Limits
    from edge_magistral.rpc.endpoints import Cluster, WorkerSpec, parse_endpoint

    set_rate(link.mbit)
    for r in relays:  # the same relays all along: llama.cpp keeps the endpoints it has seen
        r.delay_s = link.delay_ms / 1e3
    mbit = wire_bandwidth(link.delay_ms / 1e3) * 8 / 1e6
    specs = tuple(WorkerSpec(parse_endpoint(r.endpoint), mbit, link.delay_ms, n)
                  for r, n in zip(relays, args.layers, strict=True))
    req = loader.ModelRequest(model=args.model, ctx=1024, threads=args.threads, parallel=1, speculate="off",
                              cluster=Cluster(specs))
    t0 = time.monotonic()
    opened = loader.open_model(req)
    load_s = time.monotonic() - t0
    try:
        e = opened.engine
        filler = " ".join(["the quick brown fox jumps over the lazy dog"] * 200)
        ttfts, tps = [], []
        for rep in range(args.reps):
            ids = e.raw_prompt_ids(f"{rep} {filler}")[: args.prompt_tokens]
            done = next(ev for ev in e.submit(ids, Limits(temperature=0.0, max_tokens=1)) if isinstance(ev, Done))
            ttfts.append(done.timings.ttft_s)
            done = next(ev for ev in e.submit(e.raw_prompt_ids(f"{rep} Once upon a time"),
                                              Limits(temperature=0.0, max_tokens=args.gen_tokens))
                        if isinstance(ev, Done))
            tps.append(done.timings.tokens_per_s)
        return {"link": asdict(link), "effective_mbit": round(mbit, 1), "load_s": round(load_s, 3),
                "ttft_s": round(min(ttfts), 4),
                "tokens_per_s": round(max(tps), 2), "ttft_all": ttfts, "tps_all": tps,
                "buffers": e.remote_buffers.to_dict(), "predicted": predicted(opened.plan)}
    finally:
        opened.close()


def table(rows: list[dict]) -> str:
    base = rows[0]
    out = ["| link (nominal) | measured Mbit/s | load s (pred.) | TTFT ms (pred.) | tg t/s (pred.) | "
           "ms/token over loopback | predicted | TTFT ms over loopback | predicted |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        p = r["predicted"]
        bw = r["effective_mbit"] * 1e6 / 8
        load_pred = f"{p['first_load_bytes'] / bw:.1f}" if bw and p.get("first_load_bytes") else "-"
        meas = 1e3 * (1 / r["tokens_per_s"] - 1 / base["tokens_per_s"])
        pred = p["link_ms_per_token"] - base["predicted"]["link_ms_per_token"]
        ttft_pred = f"{1e3 * p['ttft_s']:.0f}" if p.get("ttft_s") is not None else "-"
        d_ttft = 1e3 * (r["ttft_s"] - base["ttft_s"])
        d_ttft_pred = 1e3 * (p["ttft_s"] - base["predicted"]["ttft_s"])
        out.append(f"| {r['link']['name']} | {r['effective_mbit']:.0f} | {r['load_s']:.1f} ({load_pred}) | "
                   f"{1e3 * r['ttft_s']:.0f} ({ttft_pred}) | {r['tokens_per_s']:.1f} ({p['tokens_per_s']:.1f}) | "
                   f"{meas:.2f} | {pred:.2f} | {d_ttft:.0f} | {d_ttft_pred:.0f} |")
    return "\n".join(out)


def inside(args) -> int:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "set", "lo", "mtu", "1500")
    tmp = Path(tempfile.mkdtemp(prefix="rpc-link-"))
    procs: list[subprocess.Popen] = []
    endpoints: list[str] = []
    try:
        for i in range(2):
            p, ep = start_worker(tmp, i, args.worker_threads)
            procs.append(p)
            endpoints.append(ep)
        relays = [DelayRelay(("127.0.0.1", int(ep.rsplit(":", 1)[1])), 0.0) for ep in endpoints]
        rows = []
        for link in LINKS:
            print(f"link: {link.name}", flush=True)
            rows.append(measure_link(link, relays, args))
            print(json.dumps({k: rows[-1][k] for k in ("load_s", "ttft_s", "tokens_per_s")}), flush=True)
    finally:
        set_rate(None)
        stop(procs)
        shutil.rmtree(tmp, ignore_errors=True)
    import edge_magistral

    result = {"what": "RPC link: measured vs planned", "model": args.model, "threads": args.threads,
              "worker_threads": args.worker_threads, "prompt_tokens": args.prompt_tokens,
              "gen_tokens": args.gen_tokens, "reps": args.reps, "version": edge_magistral.__version__,
              "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".txt").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="benchmarks/out/rpc_link.json")
    ap.add_argument("--threads", type=int, default=1, help="the head's threads")
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=512, help="the planner predicts TTFT for 512")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", default="12,9", help="layers pinned on the two workers (the rest stay on the head: "
                                                      "on one machine the planner would keep them all there)")
    args = ap.parse_args()
    args.layers = [int(x) for x in args.layers.split(",")]
    if os.environ.get(IN_NETNS) != "1":
        if not shutil.which("unshare") or not shutil.which("tc"):
            raise SystemExit("error: needs unshare (util-linux) and tc (iproute2)")
        cmd = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        return subprocess.run([*cmd, sys.executable, *sys.argv], env={**os.environ, IN_NETNS: "1"}).returncode
    return inside(args)


if __name__ == "__main__":
    sys.exit(main())
