"""`slmlab serve` under load: throughput and time to first token against concurrent clients.

    python -m benchmarks.serve [--model stories-8m] [--seconds 20] [--soak-seconds 60]
                               [--batcher-models stories-8m,smollm2-135m-instruct]

The server runs in this process on 127.0.0.1 (uvicorn on a thread, the engine on the main
thread, as `slmlab serve` runs them);
clients are asyncio tasks with one HTTP connection each, every one sending streamed
completions (64 tokens, temperature 1, ``stream_options.include_usage``) back to back for
`--seconds`. For 1, 8 and 32 clients: completion tokens per second over the whole run, its
ratio to one client's, and the time to the first piece of text (p50, p99). Then a soak: 64
clients for `--soak-seconds` against a queue of 32 rows and 16 waiting, so that some requests
are refused with 429; every request must be answered or refused, and the process's resident
memory is read at the start, half-way and at the end (a leak grows both halves alike). Goal: at least 5x one client's throughput
at 32 clients on the 8M model. Also the batcher alone, without HTTP, for each of
`--batcher-models`: tokens/s at 1, 8 and 32 rows decoding together (32 new tokens each, after
their prompts are in). Writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx

from benchmarks.common import write
from slmlab import checkpoint, zoo
from slmlab.eval import peak_rss_bytes
from slmlab.infer import BatchRequest, ContinuousBatcher
from slmlab.serve import BackgroundServer, create_app

PROMPTS = [
    "Once upon a time, Lily went to the park.",
    "Long ago, a boy named Tom lived in a small town.",
    "One day, Mia found a red ball under a bed.",
    "It was a sunny day. Ben had a dog and a blue kite.",
]


def rss_bytes() -> int:
    """The process's resident memory now (Linux), not its peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


async def client(base: str, name: str, index: int, until: float, stats: dict) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        k = 0
        while time.perf_counter() < until:
            body = {
                "model": name,
                "prompt": PROMPTS[(index + k) % len(PROMPTS)],
                "max_tokens": 64,
                "temperature": 1.0,
                "seed": index * 1000 + k,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            k += 1
            start = time.perf_counter()
            first = None
            async with http.stream("POST", f"{base}/completions", json=body) as reply:
                if reply.status_code == 429:
                    stats["refused"] += 1
                    await reply.aread()
                    await asyncio.sleep(0.05)
                    continue
                if reply.status_code != 200:
                    stats["failed"] += 1
                    await reply.aread()
                    continue
                async for line in reply.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
                    elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        first = time.perf_counter() - start
            stats["answered"] += 1
            if first is not None:
                stats["ttft"].append(first)


async def load(base: str, name: str, clients: int, seconds: float) -> dict:
    stats: dict = {"tokens": 0, "answered": 0, "refused": 0, "failed": 0, "ttft": []}
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(client(base, name, i, until, stats) for i in range(clients)))
    wall = time.perf_counter() - start
    ttft = sorted(stats.pop("ttft"))
    return {
        "clients": clients,
        **stats,
        "seconds": wall,
        "tokens_per_s": stats["tokens"] / wall,
        "ttft_p50_ms": 1e3 * statistics.median(ttft) if ttft else None,
        "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
    }


def batcher_alone(name: str, rows: int, tokens: int = 32) -> float:
    """Tokens/s of `rows` requests decoded together by `ContinuousBatcher`, no HTTP."""
    model = zoo.load(name, quick=False)
    batcher = ContinuousBatcher(model, max_batch=rows)
    for i in range(rows):
        batcher.submit(BatchRequest([1, 2, 3, 4 + i], tokens, temperature=1.0, seed=i))
    batcher.step()  # every prompt in, every first token made
    start, steps = time.perf_counter(), batcher.steps
    batcher.run()
    return rows * (batcher.steps - steps) / (time.perf_counter() - start)


def serve(name: str, max_batch: int, max_queue: int):
    path = zoo.ensure(name, quick=False)
    app = create_app(
        checkpoint.load(path),
        checkpoint.load_tokenizer(path),
        checkpoint.load_chat_settings(path),
        name=name,
        max_batch=max_batch,
        max_queue=max_queue,
        engine_thread=False,
    )
    return BackgroundServer(app), app


def drive(app, coroutine) -> dict:
    """Run the clients' `coroutine` on a thread while the engine runs here, on the main thread
    (as `slmlab serve` runs it); its result."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(asyncio.run(coroutine)))
    thread.start()
    app.state.engine.run(until=lambda: not thread.is_alive())
    thread.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories-8m")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--batcher-models", default="stories-8m,smollm2-135m-instruct")
    args = parser.parse_args()
    alone: dict = {}
    for name in filter(None, args.batcher_models.split(",")):
        speeds = {rows: batcher_alone(name, rows) for rows in (1, 8, 32)}
        alone[name] = [
            {"rows": rows, "tokens_per_s": v, "speedup": v / speeds[1]}
            for rows, v in speeds.items()
        ]
        print(name, "batcher alone:", ", ".join(f"{r}: {v:.0f} tok/s" for r, v in speeds.items()))
    server, app = serve(args.model, max_batch=32, max_queue=16)
    base = server.url
    drive(app, load(base, args.model, 1, 2))  # warm-up
    runs = []
    for clients in (1, 8, 32):
        run = drive(app, load(base, args.model, clients, args.seconds))
        runs.append(run)
        run["speedup"] = run["tokens_per_s"] / runs[0]["tokens_per_s"]
        print(
            f"{clients:3d} clients: {run['tokens_per_s']:7.1f} tok/s ({run['speedup']:.2f}x)  "
            f"first text p50 {run['ttft_p50_ms']:.0f} ms, p99 {run['ttft_p99_ms']:.0f} ms  "
            f"answered {run['answered']}, refused {run['refused']}, failed {run['failed']}"
        )
    # Two halves: memory that the first half's connections and buffers take once is not a
    # leak; a leak grows the second half as much as the first.
    rss = [rss_bytes()]
    halves = []
    for _ in range(2):
        halves.append(drive(app, load(base, args.model, 64, args.soak_seconds / 2)))
        rss.append(rss_bytes())
    engine = app.state.engine
    soak = {key: sum(h[key] for h in halves) for key in ("answered", "refused", "failed", "tokens")}
    soak.update(
        seconds=sum(h["seconds"] for h in halves),
        rss_mib=[r / 2**20 for r in rss],
        left_running=engine.batcher.running,
        left_outstanding=engine.outstanding,
    )
    print(
        f"soak, 64 clients, {args.soak_seconds:.0f} s: answered {soak['answered']}, refused "
        f"{soak['refused']}, failed {soak['failed']}; RSS at start, half-way, end "
        f"{', '.join(f'{r / 2**20:.0f}' for r in rss)} MiB; left running {engine.batcher.running}"
    )
    server.stop()
    result = {
        "model": args.model,
        "max_batch": 32,
        "max_queue": 16,
        "runs": runs,
        "soak": soak,
        "batcher_alone": alone,
        "goal: 32 clients >= 5x one": runs[-1]["speedup"] >= 5,
    }
    print(write("serve", result))


if __name__ == "__main__":
    main()
