"""Load test of `t2iadapter serve` on loopback: N requests from C concurrent clients, latency and status counts.

By default it starts its own server (`t2iadapter serve --base tiny` with a tiny random sketch adapter) on a
free 127.0.0.1 port and stops it afterwards; `--url` points it at one already running (loopback only).
Clients honour 429 + Retry-After by waiting, so 429s are the queue doing its job; any other non-200 is a
failure and makes the exit status 1.

    python benchmarks/load_test.py                      # 200 requests, 8 clients, 2 steps, queue 4
    python benchmarks/load_test.py --queue-size 8       # every client fits: no 429 expected
"""
from __future__ import annotations

import argparse
import base64
import collections
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def condition_b64(size: int = 64) -> str:
    from PIL import Image, ImageDraw

    im = Image.new("L", (size, size))
    ImageDraw.Draw(im).line((8, 8, size - 8, size - 16), fill=255, width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir: Path, queue_size: int, timeout: float, threads: int) -> tuple[subprocess.Popen, str]:
    """`t2iadapter serve --base tiny` with a random tiny sketch adapter, on a free loopback port."""
    import torch

    from t2iadapter.bases import load_base, tiny_adapter_config
    from t2iadapter.models import build_adapter

    torch.manual_seed(0)
    path = build_adapter(tiny_adapter_config(load_base("tiny"), 1)).save_file(workdir / "sketch.safetensors")
    port = free_port()
    cmd = [sys.executable, "-m", "t2iadapter.cli", "serve", "--base", "tiny", "--adapter", f"sketch={path}",
           "--host", "127.0.0.1", "--port", str(port), "--queue-size", str(queue_size), "--timeout", str(timeout),
           "--max-steps", "50", "--threads", str(threads)]
    log = open(workdir / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{(workdir / 'server.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not answer /health within 120 s")


def run_clients(url: str, args: argparse.Namespace, headers: dict[str, str]) -> dict:
    body = {"prompt": "a white line", "conditions": {"sketch": condition_b64()}, "steps": args.steps, "seed": 1}
    remaining = [args.requests]
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    errors: list[str] = []
    stop_at = time.monotonic() + args.time_limit

    def client() -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=args.request_timeout) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                try:
                    r = http.post("/v1/generate", json=body)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status, r = type(exc).__name__, None
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[status] += 1
                    if status == 200:
                        latencies.append(elapsed)
                    elif status != 429 and len(errors) < 5:
                        errors.append(f"{status}: {r.text[:200] if r is not None else ''}")
                if status == 429:
                    time.sleep(min(float(r.headers.get("retry-after", "1")), 5.0))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, name=f"client-{i}") for i in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = len(latencies)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if ok >= 2 else [latencies[0] if ok else float("nan")] * 99
    sent = sum(statuses.values())
    return {
        "requests_sent": sent,
        "not_sent_time_limit": args.requests - sent,
        "clients": args.concurrency,
        "steps": args.steps,
        "queue_size": args.queue_size if not args.url else None,
        "server_threads": args.server_threads if not args.url else None,
        "wall_s": round(wall, 2),
        "throughput_req_per_s": round(sent / wall, 2),
        "throughput_ok_per_s": round(ok / wall, 2),
        "latency_ok_p50_s": round(q[49], 3),
        "latency_ok_p95_s": round(q[94], 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
        "unexpected_failures": sum(v for k, v in statuses.items() if k not in (200, 429)),
        "first_errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one on the tiny base)")
    p.add_argument("--token", default=os.environ.get("T2IADAPTER_TOKEN"), help="bearer token of --url's server")
    p.add_argument("--requests", type=int, default=200, help="requests in all (default 200, at most 2000)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8, at most 64)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per request (default 2)")
    p.add_argument("--queue-size", type=int, default=4, help="queue of the server this script starts (default 4)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server it starts (default 1)")
    p.add_argument("--time-limit", type=float, default=600, help="stop sending after this many seconds (default 600)")
    p.add_argument("--request-timeout", type=float, default=120, help="client timeout per request in s (default 120)")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 2000 and 1 <= args.concurrency <= 64):
        p.error("--requests must be 1..2000 and --concurrency 1..64")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.url:
            if urlparse(args.url).hostname not in LOOPBACK:
                p.error(f"--url must be on loopback ({', '.join(sorted(LOOPBACK))}); this is a local load test")
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(Path(tmp), args.queue_size, args.request_timeout, args.server_threads)
        try:
            report = run_clients(url, args, headers)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print(json.dumps(report, indent=2))
    return 1 if report["unexpected_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
