#!/usr/bin/env bash
# A bounded soak of `unmask serve`: CLIENTS clients send a mixed load (streamed completions, chat, n = 4
# completions, edits) for SECONDS, while the server's resident memory (VmRSS) is sampled every INTERVAL
# seconds. Prints the series, the slope after warm-up in MiB per hour, the requests by kind and every
# failure; exits 1 if any request failed.
#
#   recipes/soak.sh [SECONDS=3600] [CLIENTS=4] [MODEL]         (MODEL: a model folder; default: the embedded model)
#   env: INTERVAL=30 (s between samples)  WARMUP=600 (s left out of the slope; at most half the run)
#        PORT=8765  UNMASK=.venv/bin/unmask  PY=.venv/bin/python  SERVE_ARGS="--max-batch 8" (extra flags)
#
# e.g. a 5-minute run with samples every 15 s:  INTERVAL=15 WARMUP=60 recipes/soak.sh 300 4
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-3600}
CLIENTS=${2:-4}
MODEL=${3:-}
INTERVAL=${INTERVAL:-30}
WARMUP=${WARMUP:-600}
PORT=${PORT:-8765}
UNMASK=${UNMASK:-.venv/bin/unmask}
PY=${PY:-.venv/bin/python}

# shellcheck disable=SC2086  # MODEL and SERVE_ARGS are word lists
$UNMASK serve $MODEL --port "$PORT" --log-level warning ${SERVE_ARGS:-} &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT

"$PY" - "$PORT" "$SERVER" "$DURATION" "$CLIENTS" "$INTERVAL" "$WARMUP" <<'EOF'
import collections, json, sys, threading, time

import httpx

port, pid, duration, clients, interval, warmup = (int(a) for a in sys.argv[1:])
url = f"http://127.0.0.1:{port}"
TEXT = "def average(values):\n    return sum(values) / len(vaules)\n"
SPAN = [TEXT.index("vaules"), TEXT.index("vaules") + 6]
LOAD = [  # (kind, path, body): each client takes them in turn, starting at its own
    ("stream", "/v1/completions", {"prompt": "def parse_args(argv):\n", "max_tokens": 32, "stream": True}),
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Reverse a list in Python."}],
                                      "max_tokens": 32}),
    ("n=4", "/v1/completions", {"prompt": "import os\n\ndef main():\n", "max_tokens": 16, "n": 4,
                                "temperature": 0.8}),
    ("edit", "/v1/edits", {"input": TEXT, "spans": [SPAN]}),
]


def rss_mib() -> float:
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def wait_for_server() -> None:
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit("the server did not start")


wait_for_server()
done = collections.Counter()
failures: list[str] = []
lock = threading.Lock()
t0 = time.monotonic()
deadline = t0 + duration


def client(i: int) -> None:
    with httpx.Client(base_url=url, timeout=600) as http:
        n = i
        while time.monotonic() < deadline:
            kind, path, body = LOAD[n % len(LOAD)]
            n += 1
            try:
                if body.get("stream"):
                    with http.stream("POST", path, json=body) as r:
                        text = "".join(r.iter_lines())
                    ok = r.status_code == 200 and text.endswith("data: [DONE]") and '"error"' not in text
                else:
                    r = http.post(path, json=body)
                    text, ok = r.text, r.status_code == 200
                why = f"{kind}: HTTP {r.status_code}: {text[:160]}"
            except httpx.HTTPError as e:
                ok, why = False, f"{kind}: {type(e).__name__}: {e}"
            with lock:
                if ok:
                    done[kind] += 1
                else:
                    failures.append(why)


threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
for t in threads:
    t.start()
series = []  # (seconds since start, RSS MiB)
while True:
    now = time.monotonic() - t0
    series.append((now, rss_mib()))
    print(f"  {now:7.0f} s  {series[-1][1]:8.1f} MiB  requests {sum(done.values()):6d}  failed {len(failures)}",
          flush=True)
    if now >= duration:
        break
    time.sleep(min(interval, max(duration - now, 0.5)))
for t in threads:
    t.join()
time.sleep(interval)
idle = rss_mib()  # after the load: what stays

skip = min(warmup, duration // 2)
tail = [(t, m) for t, m in series if t >= skip]
n = len(tail)
mean_t, mean_m = sum(t for t, _ in tail) / n, sum(m for _, m in tail) / n
var = sum((t - mean_t) ** 2 for t, _ in tail)
slope = sum((t - mean_t) * (m - mean_m) for t, m in tail) / var * 3600 if var else float("nan")
print(f"\nsoak: {duration} s, {clients} clients, RSS sampled every {interval} s")
print("series (s, MiB):", json.dumps([(round(t), round(m, 1)) for t, m in series]))
print(f"RSS: start {series[0][1]:.1f} MiB, max {max(m for _, m in series):.1f} MiB, end {series[-1][1]:.1f} MiB, "
      f"{interval} s after the load {idle:.1f} MiB")
print(f"slope after {skip} s of warm-up: {slope:+.1f} MiB/hour ({n} samples)")
print(f"requests: {sum(done.values())} ok ({', '.join(f'{k} {v}' for k, v in sorted(done.items()))}), "
      f"{len(failures)} failed")
for why in failures[:20]:
    print("  failed:", why)
sys.exit(1 if failures else 0)
EOF
