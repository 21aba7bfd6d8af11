"""Load test of `t2iadapter serve` on loopback: N requests from C concurrent clients, latency and status counts.

By default it starts its own server (`t2iadapter serve --base tiny` with a tiny random sketch adapter) on a
free 127.0.0.1 port and stops it afterwards; `--url` points it at one already running (loopback only).
Clients honour 429 + Retry-After by waiting, so 429s are the queue doing its job; any other non-200 is a
failure and makes the exit status 1. Every request has its own prompt and seed (batched requests differ).
The report gives images/s, p50/p95 latency and the server's mean batch size (from GET /metrics).

    python benchmarks/load_test.py                      # 200 requests, 8 clients, 2 steps, queue 4
    python benchmarks/load_test.py --queue-size 8       # every client fits: no 429 expected
    # issue 17 on a GPU: SD1.5-sized random base, 512², 20 steps, fast mode, 32 clients; batching vs none
    python benchmarks/load_test.py --arch sd15 --size 512 --steps 20 --fast --concurrency 32 --queue-size 64 \
        --requests 640 --max-batch 16 --batch-wait-ms 20 --compare-batch1 [--devices cuda:0,cuda:1]
    # a fresh machine compiles batches 1, 2, 4, 8, 16 at start-up (minutes); within a 10-minute call limit,
    # compile them first in a call of their own (the cache key is the architecture, not the random weights):
    python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; import load_test as t; \
        t.write_models(Path('/root/lt'), 'sd15')"
    t2iadapter compile --base /root/lt/sd15-random --adapter sketch=/root/lt/sketch.safetensors --size 512x512 \
        --batch 16 --serve
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


def write_models(workdir: Path, arch: str) -> tuple[str, Path]:
    """(base for `serve --base`, sketch adapter file): the tiny preset, or a real-size random SD1.5 base folder."""
    import torch

    from t2iadapter.bases import load_base, tiny_adapter_config
    from t2iadapter.models import FullAdapterConfig, build_adapter

    torch.manual_seed(0)
    adapter = workdir / "sketch.safetensors"
    if adapter.exists():  # a second run (--compare-batch1) reuses what the first wrote
        return ("tiny" if arch == "tiny" else str(workdir / "sd15-random")), adapter
    if arch == "tiny":
        return "tiny", build_adapter(tiny_adapter_config(load_base("tiny"), 1)).save_file(workdir / "sketch.safetensors")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_inference import build_base  # real-size random SD1.5 components (the inference benchmark's)

    folder = workdir / "sd15-random"
    if not folder.exists():
        build_base("sd15", torch.device("cpu"), torch.float32).save_pretrained(str(folder))
    return str(folder), build_adapter(FullAdapterConfig.sd(1)).save_file(workdir / "sketch.safetensors")


def start_server(workdir: Path, args: argparse.Namespace, max_batch: int) -> tuple[subprocess.Popen, str]:
    """`t2iadapter serve` on the chosen base with a random sketch adapter, on a free loopback port."""
    base, path = write_models(workdir, args.arch)
    port = free_port()
    cmd = [sys.executable, "-m", "t2iadapter.cli", "serve", "--base", base, "--adapter", f"sketch={path}",
           "--host", "127.0.0.1", "--port", str(port), "--queue-size", str(args.queue_size),
           "--timeout", str(args.request_timeout), "--max-steps", "50", "--threads", str(args.server_threads),
           "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--max-side", str(max(args.size, 64))]
    if args.devices:
        cmd += ["--devices", args.devices]
    if args.fast:
        cmd += ["--fast", "--warmup", f"{args.size}x{args.size}"]
    log = open(workdir / f"server-{max_batch}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{Path(log.name).read_text()}")
        try:
            health = httpx.get(url + "/health", timeout=1).json()
            if health["workers"] and all(w["status"] == "up" for w in health["workers"]):  # warmed up
                return proc, url
        except (httpx.TransportError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"the server's workers were not up within {args.start_timeout:g} s")


def mean_batch(url: str, headers: dict[str, str]) -> float | None:
    """The server's mean requests per batch so far, from GET /metrics."""
    try:
        from prometheus_client.parser import text_string_to_metric_families

        samples = {s.name: s.value for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                   for s in f.samples}
        return round(samples["t2iadapter_batch_jobs_sum"] / samples["t2iadapter_batch_jobs_count"], 2)
    except (ImportError, KeyError, ZeroDivisionError, httpx.HTTPError):
        return None


def run_clients(url: str, args: argparse.Namespace, headers: dict[str, str]) -> dict:
    sketch = condition_b64(args.size)
    remaining = [args.requests]
    images = [0]
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
                    n = remaining[0]
                body = {"prompt": f"a white line, take {n}", "conditions": {"sketch": sketch}, "steps": args.steps,
                        "seed": n, "width": args.size, "height": args.size}
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
                        images[0] += len(r.json()["images"])
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
        "size": args.size,
        "wall_s": round(wall, 2),
        "throughput_req_per_s": round(sent / wall, 2),
        "throughput_ok_per_s": round(ok / wall, 2),
        "images_per_s": round(images[0] / wall, 2),
        "mean_batch": mean_batch(url, headers),
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
    p.add_argument("--arch", choices=["tiny", "sd15"], default="tiny",
                   help="the server's base: the tiny preset, or real-size random SD1.5 weights (GPU; written once)")
    p.add_argument("--size", type=int, default=64, help="width = height of each request in pixels (default 64)")
    p.add_argument("--max-batch", type=int, default=4, help="the started server's --max-batch (default 4)")
    p.add_argument("--batch-wait-ms", type=float, default=10, help="the started server's --batch-wait-ms (default 10)")
    p.add_argument("--compare-batch1", action="store_true", help="run again with --max-batch 1 and report the ratio")
    p.add_argument("--devices", default=None, help="the started server's --devices, e.g. cuda:0,cuda:1")
    p.add_argument("--fast", action="store_true", help="the started server's --fast, warmed up at --size first")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for loading and warm-up")
    args = p.parse_args(argv)
    if not (1 <= args.requests <= 2000 and 1 <= args.concurrency <= 64):
        p.error("--requests must be 1..2000 and --concurrency 1..64")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be on loopback ({', '.join(sorted(LOOPBACK))}); this is a local load test")
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in [args.max_batch] + ([1] if args.compare_batch1 and not args.url else []):
            proc = None
            if args.url:
                url = args.url.rstrip("/")
            else:
                proc, url = start_server(Path(tmp), args, max_batch)
            try:
                report = run_clients(url, args, headers)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
            if not args.url:
                report.update(max_batch=max_batch, batch_wait_ms=args.batch_wait_ms, queue_size=args.queue_size,
                              server_threads=args.server_threads, arch=args.arch, fast=args.fast, devices=args.devices)
            reports.append(report)
    out = reports[0] if len(reports) == 1 else {
        "batched": reports[0], "max_batch_1": reports[1],
        "images_per_s_ratio": round(reports[0]["images_per_s"] / max(reports[1]["images_per_s"], 1e-9), 2)}
    print(json.dumps(out, indent=2))
    return 1 if any(r["unexpected_failures"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
