"""`unmask serve` (the OpenAI-compatible server and demo page) and `unmask bench serve`."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from unmask.cli.apps import app, bench_app
from unmask.cli.common import Quantize, console, load_pipeline, out


@app.command()
def serve(
    model: Optional[Path] = typer.Argument(None, help="Model folder (default: the embedded model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, "--port"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    quantize: Quantize = None,
    max_batch: int = typer.Option(8, "--max-batch", help="Requests denoised together in one forward pass."),
    max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests before answering 429."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                             help="Default max_tokens of a request (default: the model's own)."),
    block_length: Optional[int] = typer.Option(None, "--block-length", min=1,
                                               help="Default block length (default: the model's own)."),
    name: Optional[str] = typer.Option(None, "--name", help="Model id reported by /v1/models."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the engine's forward passes (GPU)."),
    prefix_blocks: int = typer.Option(64, "--prefix-cache-blocks", min=0,
                                      help="block_causal models: finished prompt blocks whose K/V are kept for "
                                           "later requests that start the same way (0: off)."),
    shutdown_timeout: float = typer.Option(3.0, "--shutdown-timeout", min=0.0,
                                           help="On SIGTERM/SIGINT: seconds requests being decoded get to finish "
                                                "(waiting ones are refused at once), then they are cancelled."),
    header_timeout: float = typer.Option(10.0, "--header-timeout", min=0.1,
                                         help="Seconds a request's headers may take to arrive (then 408)."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", min=0.1,
                                       help="Seconds a request's body may take to arrive (then 408)."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Serve a model: OpenAI-compatible API under /v1 and a live denoising demo page at /."""
    from unmask.decoding.queues import request_queue
    from unmask.serve import memory, runner
    from unmask.serve.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    memory.bound_allocator()  # before the model's tensors: bounded resident memory in a long run
    pipe = load_pipeline(model, device, dtype, quantize)
    engine = request_queue(pipe.model, max_batch=max_batch, max_queue=max_queue, compile=compile,
                           prefix_blocks=prefix_blocks)
    # the model's recommended decoding (generation_config.json) is what a request gets unless it says otherwise
    given = {"max_new_tokens": max_tokens, "block_length": block_length}
    web = create_app(pipe, model_name=name, engine=engine,
                     defaults=pipe.defaults.replace(**{k: v for k, v in given.items() if v is not None}))
    console.print(f"serving [bold]{web.state.server.model_name}[/bold] on http://{host}:{port}  "
                  f"(page: /, API: /v1, docs: /docs)")
    limits = runner.ConnectionLimits(header_timeout=header_timeout, body_timeout=body_timeout,
                                     shutdown_timeout=shutdown_timeout)
    runner.serve(web, host=host, port=port, log_level=log_level, limits=limits)


def _load_clients(url: str, clients: int, seconds: float, body: dict) -> dict:
    """N threads posting `body` to /v1/completions until the deadline; latencies and failures."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    tokens = [0]
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(60.0, 4 * seconds)) as http:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json=body)
                    ok = r.status_code == 200
                    why = f"HTTP {r.status_code}: {r.text[:120]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                        tokens[0] += r.json()["usage"]["completion_tokens"]
                    else:
                        failures.append(why)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start  # includes the requests in flight at the deadline
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {"requests": len(lat), "failed": len(failures), "first_failure": failures[0] if failures else "",
            "wall": wall, "rps": len(lat) / wall, "tps": tokens[0] / wall, "p50": pct(0.50),
            "p99": pct(0.99), "mean": statistics.fmean(lat) if lat else float("nan")}


@bench_app.command("serve")
def bench_serve(
    model: Optional[Path] = typer.Argument(None, help="Model folder (default: the embedded model)."),
    clients: int = typer.Option(8, "--clients", "-c", help="Concurrent clients."),
    seconds: float = typer.Option(10.0, "--seconds", "-s", help="How long each configuration is loaded."),
    max_tokens: int = typer.Option(32, "--max-tokens"),
    block_length: int = typer.Option(32, "--block-length"),
    steps: Optional[int] = typer.Option(None, "--steps", help="Fixed denoising steps (default: threshold policy)."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Batch size of the batched run (default: clients)."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also run one-at-a-time (max_batch=1)."),
    prompt: str = typer.Option("def parse_args(argv):\n", "--prompt"),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype"),
    quantize: Quantize = None,
) -> None:
    """N concurrent clients against the server on loopback: requests/s, p50/p99 latency, failures;
    batched (max_batch = clients) against one-at-a-time (max_batch = 1)."""
    import httpx
    from rich.table import Table

    from unmask.decoding.queues import request_queue
    from unmask.errors import UnmaskError
    from unmask.serve.app import create_app
    from unmask.serve.metrics import RssSampler
    from unmask.serve.runner import BackgroundServer

    if clients < 1 or seconds <= 0:
        raise UnmaskError("--clients must be >= 1 and --seconds > 0")
    pipe = load_pipeline(model, device, dtype, quantize)
    body = {"prompt": prompt, "max_tokens": max_tokens, "block_length": block_length, "temperature": 0.0}
    if steps:
        body["steps"] = steps
    batches = [max_batch or clients] + ([1] if compare and (max_batch or clients) > 1 else [])
    rows = []
    for b in batches:
        engine = request_queue(pipe.model, max_batch=b, max_queue=max(64, 2 * clients))
        web = create_app(pipe, engine=engine)
        with BackgroundServer(web) as srv:
            with console.status(f"max_batch={b}: {clients} clients for {seconds:g}s …"):
                httpx.post(srv.url + "/v1/completions", json=body, timeout=600)  # warm-up: first-call costs
                with RssSampler() as rss:  # the whole process: model, server and the client threads
                    rows.append((b, {**_load_clients(srv.url, clients, seconds, body), "rss": rss}))

    table = Table(title=f"unmask bench serve · {clients} clients · {seconds:g}s each · {max_tokens} tokens/request")
    for col in ("max_batch", "requests", "failed", "req/s", "tokens/s", "p50 s", "p99 s"):
        table.add_column(col, justify="right")
    for b, r in rows:
        table.add_row(str(b), str(r["requests"]), str(r["failed"]), f"{r['rps']:.2f}", f"{r['tps']:.1f}",
                      f"{r['p50']:.3f}", f"{r['p99']:.3f}")
    out.print(table)
    for b, r in rows:  # the whole process: model, server and the client threads
        rss = r["rss"]
        out.print(f"max_batch={b}: resident memory {rss.start:.0f} MiB at the start, {rss.peak:.0f} MiB at its peak, "
                  f"{rss.end:.0f} MiB at the end")
    if len(rows) == 2 and rows[1][1]["rps"] > 0:
        out.print(f"batching speed-up: {rows[0][1]['rps'] / rows[1][1]['rps']:.2f}x requests/s")
    for b, r in rows:
        if r["failed"]:
            console.print(f"[red]max_batch={b}: {r['failed']} failed; first: {r['first_failure']}[/red]")
