"""Serving fairness, measured: whole admission of `n` choices and completions interleaved with a long edit.

    .venv/bin/python recipes/serve-fairness.py              # all three, about 2 minutes on 2 CPU cores
    .venv/bin/python recipes/serve-fairness.py --only edit --spans 1000

A tiny random model (a 512-token BPE trained on stdlib sources, 2 layers of 64) is served on a loopback port
with max_batch 8 and max_queue 64, and driven by the official `openai` client:

  burst   5 concurrent requests with n=16 on an idle server: how many complete (and how many got a 429)
  retry   10 clients, each sending n=16 requests in a loop and retrying a 429 after the Retry-After it was
          given, for --duration seconds: attempts, successes, success rate
  edit    an Instant Edit with --spans spans (default decoding: one token per step on a random model, so
          thousands of steps) and, a second into it, a 4-token completion: how long each took

Prints one JSON object per measurement. Nothing here depends on the version of unmask it runs against
(PYTHONPATH=<another checkout>/src measures that one).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import openai
import torch

from unmask.model.config import ModelConfig
from unmask.model.transformer import Transformer
from unmask.pipeline import Pipeline
from unmask.serve.app import create_app
from unmask.serve.runner import BackgroundServer
from unmask.serve.schema import ServerLimits
from unmask.tokenizer import Tokenizer


def tiny_pipeline(max_seq_len: int) -> Pipeline:
    root = Path(json.__file__).parent.parent
    files = sorted(p for d in ("json", "email", "http", "logging", "unittest") for p in (root / d).glob("*.py"))
    tok = Tokenizer.train([p.read_text(encoding="utf-8", errors="replace") for p in files[:60]], vocab_size=512)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=max_seq_len, mask_id=tok.mask_id, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         block_size=8)
    torch.manual_seed(0)
    return Pipeline(Transformer(config).init_weights(0).eval(), tok)


def retry_seconds(error: openai.RateLimitError) -> float:
    headers = error.response.headers
    if "retry-after-ms" in headers:
        return float(headers["retry-after-ms"]) / 1000
    return float(headers.get("retry-after", "1"))


def burst(client: openai.OpenAI, requests: int, n: int, max_tokens: int) -> dict:
    codes: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            r = client.completions.create(model="tiny", prompt=f"def f{i}(x):\n", n=n, max_tokens=max_tokens)
            code = 200 if len(r.choices) == n else -1
        except openai.APIStatusError as e:
            code = e.status_code
        with lock:
            codes.append(code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"measure": "burst", "requests": requests, "n": n, "completed": codes.count(200),
            "refused_429": codes.count(429), "other": len(codes) - codes.count(200) - codes.count(429),
            "seconds": round(time.perf_counter() - t0, 2)}


def retry_loop(client: openai.OpenAI, clients: int, n: int, max_tokens: int, duration: float) -> dict:
    stats = {"attempts": 0, "successes": 0, "refused": 0, "errors": 0}
    lock = threading.Lock()
    end = time.monotonic() + duration

    def count(key: str) -> None:
        with lock:
            stats["attempts"] += 1
            stats[key] += 1

    def loop(i: int) -> None:
        while time.monotonic() < end:
            try:
                client.completions.create(model="tiny", prompt=f"class C{i}:\n", n=n, max_tokens=max_tokens)
                count("successes")
            except openai.RateLimitError as e:
                count("refused")
                time.sleep(retry_seconds(e))  # as told
            except openai.APIError:
                count("errors")

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = stats["successes"] / max(stats["attempts"], 1)
    return {"measure": "retry", "clients": clients, "n": n, "seconds": duration, **stats,
            "success_rate": round(rate, 4)}


def edit_and_completion(client: openai.OpenAI, spans: int, delay: float, timeout: float) -> dict:
    text = "".join(f"x{i} = {i % 10}\n" for i in range(spans))
    offsets, pos = [], 0
    for line in text.splitlines(keepends=True):
        eq = line.index("= ") + 2
        offsets.append([pos + eq, pos + eq + 1])  # the digit of each line
        pos += len(line)
    out: dict = {}

    def edit() -> None:
        t0 = time.perf_counter()
        try:
            r = client.post("/edits", cast_to=object, body={"input": text, "spans": offsets}, options={"timeout": timeout})
            out["edit_ok"] = r["choices"][0]["text"] != ""
            out["edit_steps"] = r["usage"]["steps"]
        except openai.APIError as e:
            out["edit_error"] = str(e)[:200]
        out["edit_seconds"] = round(time.perf_counter() - t0, 2)

    thread = threading.Thread(target=edit)
    thread.start()
    time.sleep(delay)
    t0 = time.perf_counter()
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n", max_tokens=4)
    out["completion_seconds"] = round(time.perf_counter() - t0, 3)
    out["completion_tokens"] = r.usage.completion_tokens
    out["edit_running_when_completion_finished"] = thread.is_alive()
    thread.join()
    return {"measure": "edit", "spans": spans, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("burst", "retry", "edit"), action="append")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the retry measurement")
    ap.add_argument("--spans", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16, help="per choice, burst and retry")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (smaller: an overload)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = tiny_pipeline(args.max_seq_len)
    app = create_app(pipe, model_name="tiny", max_batch=8, max_queue=args.max_queue,
                     limits=ServerLimits(max_spans=max(64, args.spans)))
    todo = args.only or ["burst", "retry", "edit"]
    with BackgroundServer(app) as srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                                                     timeout=600) as client:
        client.completions.create(model="tiny", prompt="warm up", max_tokens=4)
        if "burst" in todo:
            print(json.dumps(burst(client, 5, 16, args.max_tokens)), flush=True)
        if "retry" in todo:
            print(json.dumps(retry_loop(client, 10, 16, args.max_tokens, args.duration)), flush=True)
        if "edit" in todo:
            print(json.dumps(edit_and_completion(client, args.spans, 1.0, 600)), flush=True)


if __name__ == "__main__":
    main()
