"""Loopback load test of `vitlab serve`: requests/s and p50/p99 latency at several concurrencies, with
and without dynamic batching, and the server's memory over a few thousand requests.

    python benchmarks/serve/load.py [--model vit_conv_32px.vitlab_cifar10] [--requests 400] [--seconds 20]

Each mode starts its own `vitlab serve` on a free loopback port; a light asyncio client (raw HTTP/1.1
keep-alive connections, one per concurrent user) posts the same PNG to /v1/predict. Every level is
bounded by --requests and --seconds. Prints a markdown report (and --json writes the numbers).
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request

import numpy as np
from PIL import Image

BOUNDARY = "vitlabloadtest"


def request_bytes(host: str, port: int, image: bytes, path: str = "/v1/predict") -> bytes:
    """One multipart POST of ``image``, ready to write to a socket."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"load.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response; its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def level(host: str, port: int, payload: bytes, concurrency: int, requests: int, seconds: float) -> dict:
    """``concurrency`` users posting back to back until ``requests`` are sent or ``seconds`` pass."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def user() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                t = time.perf_counter()
                writer.write(payload)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "wall_s": round(wall, 2),
            "rps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "statuses": statuses}


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


class Server:
    """`vitlab serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, options: list[str]) -> None:
        cmd = [sys.executable, "-m", "vitlab", "serve", "--model", model, "--port", "0", "--no-access-log", *options]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if " at http://" not in line:
            raise RuntimeError(f"vitlab serve did not start: {line}{self.proc.stdout.read(2000)}")
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        self.host, port = url.split("//", 1)[1].rstrip("/").split(":")
        self.port = int(port)
        for _ in range(400):
            try:
                urllib.request.urlopen(f"{url}healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_image(size: int = 96) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_conv_32px.vitlab_cifar10")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="most requests per level")
    parser.add_argument("--seconds", type=float, default=20, help="most seconds per level")
    parser.add_argument("--memory-requests", type=int, default=3000, help="requests of the memory phase")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    image = test_image()
    modes = {"dynamic batching (max batch 16, 5 ms window)": [],
             "no batching (--max-batch 1)": ["--max-batch", "1"]}
    results: dict = {"model": args.model, "cpu": cpu_model(), "cpus": os.cpu_count(), "modes": {}}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for mode, options in modes.items():
        server = Server(args.model, options)
        try:
            payload = request_bytes(server.host, server.port, image)
            asyncio.run(level(server.host, server.port, payload, 4, 50, 10))  # warm-up
            rows = [asyncio.run(level(server.host, server.port, payload, c, args.requests, args.seconds))
                    for c in levels]
            memory = None
            if options == []:  # the memory phase: thousands of requests at the highest concurrency
                before = rss_mb(server.proc.pid)
                done, marks = 0, []
                while done < args.memory_requests:
                    n = min(1000, args.memory_requests - done)
                    done += asyncio.run(level(server.host, server.port, payload, levels[-1], n, 600))["requests"]
                    marks.append((done, round(rss_mb(server.proc.pid), 1)))
                memory = {"rss_mb_before": round(before, 1), "rss_mb_after": marks}
            results["modes"][mode] = {"levels": rows, "memory": memory}
            print(f"{mode}: " + "; ".join(f"c={r['concurrency']} {r['rps']} req/s p50 {r['p50_ms']} ms "
                                          f"p99 {r['p99_ms']} ms" for r in rows), file=sys.stderr)
        finally:
            server.stop()
    print(report(results, args, started))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def report(results: dict, args: argparse.Namespace, started: str) -> str:
    """The markdown of ``results``."""
    import torch

    out = [f"- model: `{results['model']}`; POST /v1/predict of one 96 x 96 PNG, keep-alive connections, "
           f"client and server on the same machine",
           f"- machine: {results['cpu']}, {results['cpus']} logical CPUs (`lscpu` model name); torch "
           f"{torch.__version__}, {torch.get_num_threads()} threads",
           f"- bounds: at most {args.requests} requests or {args.seconds:g} s per level; date {started}", "",
           "| mode | concurrency | requests | req/s | p50 ms | p99 ms | statuses |", "|---|---:|---:|---:|---:|---:|---|"]
    for mode, data in results["modes"].items():
        for r in data["levels"]:
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
            out.append(f"| {mode} | {r['concurrency']} | {r['requests']} | {r['rps']} | {r['p50_ms']} | "
                       f"{r['p99_ms']} | {statuses} |")
    for mode, data in results["modes"].items():
        if data["memory"]:
            marks = ", ".join(f"{mb} MiB after {n:,}" for n, mb in data["memory"]["rss_mb_after"])
            out += ["", f"Server memory ({mode}, concurrency {args.concurrency.split(',')[-1]}): "
                        f"{data['memory']['rss_mb_before']} MiB before, {marks} requests."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
