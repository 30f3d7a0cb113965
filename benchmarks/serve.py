"""`slmlab serve` under load: throughput and time to first token against concurrent clients.

    python -m benchmarks.serve [--model stories-8m] [--seconds 12] [--rounds 3]
                               [--soak-seconds 60]
                               [--batcher-models stories-8m,smollm2-135m-instruct]

The server runs in this process on 127.0.0.1 (uvicorn on a thread, the engine on the main
thread, as `slmlab serve` runs them); the clients run in a process of their own, as asyncio
tasks with one HTTP connection each, every one sending streamed completions (64 tokens,
temperature 1, ``stream_options.include_usage``) back to back for `--seconds`. (On a thread of
this process, their Python would take the server's interpreter lock: the earlier runs measured
that way got 2.1x at 32 clients.) For 1, 8 and 32 clients, in `--rounds` rounds of the three in
turn: completion tokens per second over each run, its ratio to the same round's one client, the
time to the first piece of text (p50, p99), the rows of the average decode step, and the cores
the clients' process used; the medians over the rounds are the result. Then a soak: 64
clients for `--soak-seconds` against a queue of 32 rows and 16 waiting, so that some requests
are refused with 429; every request must be answered or refused, and the process's resident
memory is read at the start, half-way and at the end (a leak grows both halves alike). Goal:
at least 5x one client's throughput at 32 clients on the 8M model.

Where the throughput goes, without HTTP: the batcher alone, for each of `--batcher-models`,
tokens/s at 1, 8 and 32 rows decoding together (32 new tokens each, after their prompts are
in); and the batcher as the server keeps it (`batcher_churn`), the served model's rows kept
full by requests of 64 tokens, each new one's prompt computed between decode steps. Writes
benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import queue
import resource
import statistics
import time

import httpx

try:
    import uvloop
except ImportError:  # Windows has none; asyncio's own loop is slower, not wrong
    uvloop = None

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


def batcher_churn(name: str, rows: int, seconds: float = 10) -> float:
    """Tokens/s of `ContinuousBatcher` kept at `rows` requests as the clients keep the server:
    `PROMPTS` with 64 new tokens each, a new request submitted as each one ends, so that its
    prompt comes in while the others decode; no HTTP."""
    path = zoo.ensure(name, quick=False)
    tokenizer = checkpoint.load_tokenizer(path)
    prompts = [tokenizer.encode(p).ids for p in PROMPTS]
    batcher = ContinuousBatcher(checkpoint.load(path), max_batch=rows)
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        request = BatchRequest(
            prompts[submitted % len(prompts)], 64, temperature=1.0, seed=submitted,
            on_token=lambda _, token: token is None and submit(),
        )  # fmt: skip
        submitted += 1
        batcher.submit(request)

    for _ in range(rows):
        submit()
    for _ in range(64):  # past the first requests' common start
        batcher.step()
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += batcher.running
        batcher.step()
    return tokens / (time.perf_counter() - start)


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


def _clients_process(base: str, name: str, clients: int, seconds: float, out) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)  # after this process's imports
    # The clients share the server's cores here (on a network they would not), so they run on
    # uvloop where it is installed: 0.26 cores at 32 clients instead of 0.30.
    run = uvloop.run if uvloop is not None else asyncio.run
    result = run(load(base, name, clients, seconds))
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["client_cpu_cores"] = used / result["seconds"]
    out.put(result)


def drive(app, base: str, name: str, clients: int, seconds: float) -> dict:
    """`load`'s clients in a process of their own while the engine runs here, on the main
    thread (as `slmlab serve` runs it); their result, with the decode steps the engine took
    and how many rows each had. The clients' Python does not take the server's interpreter
    lock, as it would on a thread here; it still takes its share of the same cores."""
    context = multiprocessing.get_context("spawn")  # no copy of this process's threads
    results = context.Queue()
    process = context.Process(
        target=_clients_process, args=(base, name, clients, seconds, results), daemon=True
    )
    engine = app.state.engine
    steps = engine.batcher.steps
    process.start()
    out: dict = {}

    def clients_done() -> bool:
        with contextlib.suppress(queue.Empty):
            out.update(results.get_nowait())
        return bool(out) or not process.is_alive()

    engine.run(until=clients_done)
    process.join()
    if not out:
        raise RuntimeError(f"the client process ended with exit code {process.exitcode}")
    out["engine_steps_per_s"] = (engine.batcher.steps - steps) / out["seconds"]
    out["rows_per_step"] = out["tokens"] / max(1, engine.batcher.steps - steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories-8m")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--soak-seconds", type=float, default=60)
    parser.add_argument("--batcher-models", default="stories-8m,smollm2-135m-instruct")
    args = parser.parse_args()
    # The server first, in a process that has loaded nothing else, as `slmlab serve` runs it.
    server, app = serve(args.model, max_batch=32, max_queue=16)
    base = server.url
    drive(app, base, args.model, 1, 2)  # warm-up
    # Rounds of 1, 8 and 32 clients in turn: a shared machine drifts by a tenth or more within
    # minutes, so each ratio compares runs of one round, and the medians are reported.
    rounds: list[list[dict]] = []
    for r in range(args.rounds):
        round_runs: list[dict] = []
        for clients in (1, 8, 32):
            run = drive(app, base, args.model, clients, args.seconds)
            run["speedup"] = run["tokens_per_s"] / (round_runs or [run])[0]["tokens_per_s"]
            round_runs.append(run)
            print(
                f"round {r}, {clients:2d} clients: {run['tokens_per_s']:7.1f} tok/s "
                f"({run['speedup']:.2f}x)  first text p50 {run['ttft_p50_ms']:.0f} ms, p99 "
                f"{run['ttft_p99_ms']:.0f} ms  answered {run['answered']}, refused "
                f"{run['refused']}, failed {run['failed']}; {run['rows_per_step']:.1f} rows a "
                f"step, {run['engine_steps_per_s']:.0f} steps/s, clients' CPU "
                f"{run['client_cpu_cores']:.2f} cores"
            )
        rounds.append(round_runs)
    runs = []
    for i, clients in enumerate((1, 8, 32)):
        speeds = [rr[i]["tokens_per_s"] for rr in rounds]
        ratios = [rr[i]["speedup"] for rr in rounds]
        runs.append({
            "clients": clients,
            "tokens_per_s": statistics.median(speeds),
            "speedup": statistics.median(ratios),
            "speedups": ratios,
            "ttft_p50_ms": statistics.median(rr[i]["ttft_p50_ms"] for rr in rounds),
            "ttft_p99_ms": max(rr[i]["ttft_p99_ms"] for rr in rounds),
        })  # fmt: skip
        print(
            f"{clients:2d} clients, median of {len(rounds)} rounds: "
            f"{runs[-1]['tokens_per_s']:.0f} tok/s, {runs[-1]['speedup']:.2f}x "
            f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    # Two halves: memory that the first half's connections and buffers take once is not a
    # leak; a leak grows the second half as much as the first.
    rss = [rss_bytes()]
    halves = []
    for _ in range(2):
        halves.append(drive(app, base, args.model, 64, args.soak_seconds / 2))
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
    alone: dict = {}
    for name in filter(None, args.batcher_models.split(",")):
        speeds = {rows: batcher_alone(name, rows) for rows in (1, 8, 32)}
        alone[name] = [
            {"rows": rows, "tokens_per_s": v, "speedup": v / speeds[1]}
            for rows, v in speeds.items()
        ]
        print(name, "batcher alone:", ", ".join(f"{r}: {v:.0f} tok/s" for r, v in speeds.items()))
    # The server's engine between the batcher alone and HTTP: requests coming and going.
    churn = {rows: batcher_churn(args.model, rows) for rows in (1, 8, 32)}
    churning = [
        {"rows": rows, "tokens_per_s": v, "speedup": v / churn[1]} for rows, v in churn.items()
    ]
    print(args.model, "batcher, requests coming and going:",
          ", ".join(f"{r}: {v:.0f} tok/s" for r, v in churn.items()))  # fmt: skip
    result = {
        "model": args.model,
        "max_batch": 32,
        "max_queue": 16,
        "runs": runs,
        "rounds": rounds,
        "soak": soak,
        "batcher_alone": alone,
        "batcher_churn": {args.model: churning},
        "goal: 32 clients >= 5x one": runs[-1]["speedup"] >= 5,
    }
    print(write("serve", result))


if __name__ == "__main__":
    main()
