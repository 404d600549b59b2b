"""Latency and throughput of `lora4diffusion serve`, measured over HTTP as the page sees them.

    python benchmarks/serve_latency.py                      # starts a server on a free port (shipped base)
    python benchmarks/serve_latency.py --checkpoint runs/x  # another base
    python benchmarks/serve_latency.py --url http://127.0.0.1:7860/   # a server you started

Prints (and with --json writes) the median of --repeats runs of:
  * first preview / final image: "generate" of a 10-digit row (prompt 0-9; a prompt model: "the digit 0 | ...
    | the digit 9") at the defaults (the pipeline's DDIM steps, w 1.25),
    over the streaming endpoint: time to the first predicted-x0 frame and to the final grid;
  * slider move -> new image: a generate request with bold at a new weight (what releasing a slider sends),
    after the adapter has been loaded once (the first load is reported on its own);
  * throughput: --clients concurrent clients each asking --per-client 10-digit rows: images per second;
  * 429: max_queue + 4 requests at once: how many were answered 200 / 429 and how fast a 429 comes back.
Needs httpx (in the test extra). Run it on an otherwise idle machine; numbers from a shared one mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "lora4diffusion", "serve", "--port", str(port), "--device", args.device,
           "--queue", str(args.queue)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    proc.stdout.readline()
    url = f"http://127.0.0.1:{port}/"
    for _ in range(300):
        try:
            httpx.get(url + "api/info", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not start")


def stream_times(client: httpx.Client, body: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = None
    with client.stream("POST", "api/generate/stream", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line == "event: preview" and first is None:
                first = time.perf_counter() - t0
            if line == "event: done":
                break
            if line == "event: error":
                raise SystemExit(f"error from the server: {r.read()}")
    return first or float("nan"), time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--queue", type=int, default=8, help="--queue of the started server")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--adapter", default="bold")
    p.add_argument("--steps", type=int, help="sampling steps (default: the server's default)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    proc, url = (None, args.url.rstrip("/") + "/") if args.url else start_server(args)
    try:
        client = httpx.Client(base_url=url, timeout=300)
        info = client.get("api/info").json()
        steps = args.steps or info["defaults"]["steps"]
        # a 10-digit row: "0-9" for a label model, one prompt per digit (one column each) for a prompt model
        digits = " | ".join(f"the digit {d}" for d in range(10)) if info.get("model") == "prompt" else "0-9"
        row = {"prompt": digits, "seed": 0, "steps": steps, "guidance": info["defaults"]["guidance"]}
        stream_times(client, row)  # warm-up
        runs = [stream_times(client, {**row, "seed": i}) for i in range(args.repeats)]
        res = {"device": info["device"], "checkpoint": info["checkpoint"], "steps": row["steps"],
               "first_preview_s": statistics.median(r[0] for r in runs),
               "final_row_s": statistics.median(r[1] for r in runs)}

        def gen(body):
            t0 = time.perf_counter()
            r = client.post("api/generate", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0

        res["adapter_first_load_s"] = gen({**row, "loras": {args.adapter: 0.5}})
        weights = [round(0.1 * (i + 1), 2) for i in range(args.repeats)]
        slider = [gen({**row, "loras": {args.adapter: w}}) for w in weights]
        res["slider_to_image_s"] = statistics.median(slider)

        done, lock = [0], threading.Lock()

        def client_loop():
            with httpx.Client(base_url=url, timeout=600) as c:
                for i in range(args.per_client):
                    c.post("api/generate", json={**row, "seed": i}).raise_for_status()
                    with lock:
                        done[0] += 10

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        res["throughput_images_per_s"] = done[0] / (time.perf_counter() - t0)
        res["clients"] = args.clients

        n = info["limits"]["queue"] + 4
        codes, t429 = [], []

        def burst():
            with httpx.Client(base_url=url, timeout=600) as c:
                t = time.perf_counter()
                code = c.post("api/generate", json=row).status_code
                with lock:
                    codes.append(code)
                    if code == 429:
                        t429.append(time.perf_counter() - t)

        threads = [threading.Thread(target=burst) for _ in range(n)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        res["burst"] = {"requests": n, "ok": codes.count(200), "429": codes.count(429),
                        "median_429_s": statistics.median(t429) if t429 else None}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
    for k, v in res.items():
        print(f"{k:>26}: {v:.3f}" if isinstance(v, float) else f"{k:>26}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
