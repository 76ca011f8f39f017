"""Load on the HTTP service: N concurrent streaming clients send M chat requests in all.

Reports p50/p99 time to first token (as the client sees it: queue wait included), aggregate
generated tokens per second, and the requests lost: those that got neither a complete answer
(``[DONE]`` after a finish_reason) nor an explicit error (an HTTP error status or an error event).
Lost must be 0. Writes benchmarks/out/serve_load.json.

    python benchmarks/serve_load.py                       # starts a server on the tiny Magistral
    python benchmarks/serve_load.py --model X.gguf --clients 8 --requests 64 --max-tokens 128
    python benchmarks/serve_load.py --url http://127.0.0.1:8080 --clients 8   # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "out" / "serve_load.json"
KEY = "serve-load-benchmark-key-0123"


@dataclass
class Result:
    status: int
    outcome: str  # complete | error | lost
    ttft_s: float | None = None
    duration_s: float = 0.0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


async def one_request(client: httpx.AsyncClient, i: int, args: argparse.Namespace) -> Result:
    body = {"model": "any", "messages": [{"role": "user", "content": f"Request {i}: count to ten."}],
            "stream": True, "stream_options": {"include_usage": True}, "max_tokens": args.max_tokens,
            "max_thinking_tokens": args.think_budget, "seed": i}
    t0 = time.monotonic()
    r = Result(status=0, outcome="lost")
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                await resp.aread()
                r.outcome, r.error = "error", resp.json().get("error", {}).get("code") or str(resp.status_code)
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    r.outcome = "complete" if r.finish_reason else "lost"
                    break
                event = json.loads(data)
                if "error" in event:
                    r.outcome, r.error = "error", event["error"].get("code")
                    break
                if event.get("usage"):
                    r.completion_tokens = event["usage"]["completion_tokens"]
                for c in event.get("choices", []):
                    d = c.get("delta", {})
                    if r.ttft_s is None and (d.get("content") or d.get("reasoning_content")):
                        r.ttft_s = time.monotonic() - t0
                    r.finish_reason = c.get("finish_reason") or r.finish_reason
    except httpx.HTTPError as e:  # a dropped connection with no explicit error: lost
        r.error = type(e).__name__
    finally:
        r.duration_s = time.monotonic() - t0
    return r


async def run_load(url: str, key: str | None, args: argparse.Namespace) -> tuple[list[Result], float]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    todo = iter(range(args.requests))
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in todo:  # shared iterator: each client takes the next request number
            results.append(await one_request(client, i, args))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.timeout, limits=limits) as client:
        t0 = time.monotonic()
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
        return results, time.monotonic() - t0


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def start_server(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "EDGE_MAGISTRAL_API_KEY": KEY}
    cmd = [sys.executable, "-m", "edge_magistral", "serve", "--model", str(model), "--port", "0",
           "--queue-size", str(max(args.clients, 1)), *args.serve_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env)
    end = time.monotonic() + 600
    while time.monotonic() < end and proc.poll() is None:
        m = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if m:
            try:
                if httpx.get(f"{m.group(1)}/health", timeout=2).status_code == 200:
                    return proc, m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")


def tiny_model(d: Path) -> Path:
    from edge_magistral.build.checkpoint import open_checkpoint
    from edge_magistral.build.convert import convert
    from edge_magistral.build.tiny import make_tiny_checkpoint

    return convert(open_checkpoint(make_tiny_checkpoint(d / "ckpt")), d / "tiny-F32.gguf", "F32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (else one is started)")
    ap.add_argument("--key", default=os.environ.get("EDGE_MAGISTRAL_API_KEY"), help="its API key")
    ap.add_argument("--model", type=Path, help="GGUF to serve (default: the tiny random Magistral, built here)")
    ap.add_argument("--serve-args", default="--ctx 2048 --threads 1", help="extra `serve` options")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--think-budget", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        url, key, model = args.url, args.key, args.model
        if url is None:
            model = model or tiny_model(Path(tmp))
            proc, url = start_server(model, args, Path(tmp) / "serve.log")
            key = KEY
        try:
            results, wall = asyncio.run(run_load(url, key, args))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    tokens = sum(r.completion_tokens for r in results)
    summary = {
        "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "think_budget": args.think_budget, "model": str(model) if model else None, "url_given": bool(args.url),
        "serve_args": args.serve_args if not args.url else None,
        "complete": sum(r.outcome == "complete" for r in results),
        "explicit_errors": sum(r.outcome == "error" for r in results),
        "lost": sum(r.outcome == "lost" for r in results) + (args.requests - len(results)),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        "completion_tokens": tokens, "wall_s": wall, "aggregate_tokens_per_s": tokens / wall if wall else 0.0,
        "errors": sorted({r.error for r in results if r.error}),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "results": [asdict(r) for r in results]}, indent=2))
    print(json.dumps(summary, indent=2))
    if summary["lost"]:
        raise SystemExit(f"{summary['lost']} requests lost")


if __name__ == "__main__":
    main()
