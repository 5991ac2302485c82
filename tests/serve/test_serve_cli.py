"""`unmask serve` wiring and `unmask bench serve` end to end on a saved tiny model."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from unmask.cli.main import main
from unmask.serve import runner


def test_serve_command_builds_the_app(saved_model_dir, monkeypatch):
    seen = {}

    def fake_serve(app, host, port, log_level, limits):
        seen.update(app=app, host=host, port=port, limits=limits)

    monkeypatch.setattr(runner, "serve", fake_serve)
    rc = main(["serve", str(saved_model_dir), "--port", "8123", "--max-batch", "2", "--max-tokens", "6",
               "--name", "tiny-test", "--log-level", "warning", "--shutdown-timeout", "1.5",
               "--header-timeout", "4", "--body-timeout", "6"])
    assert rc == 0 and seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    limits = seen["limits"]
    assert (limits.shutdown_timeout, limits.header_timeout, limits.body_timeout) == (1.5, 4.0, 6.0)
    with TestClient(seen["app"]) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny-test"
        r = c.post("/v1/completions", json={"prompt": "def f():", "steps": 3})
        assert r.status_code == 200 and r.json()["usage"]["steps"] == 3
        assert len(r.json()["choices"][0]["text"]) >= 0 and r.json()["usage"]["completion_tokens"] <= 6
    assert seen["app"].state.server.worker.engine.max_batch == 2


def test_serve_command_rejects_a_missing_model(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "error" in capsys.readouterr().err


def test_bench_serve_reports_throughput_and_no_failures(saved_model_dir, capsys):
    rc = main(["bench", "serve", str(saved_model_dir), "--clients", "2", "--seconds", "1", "--max-tokens", "4",
               "--steps", "2", "--block-length", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = re.findall(r"│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*([\d.]+)\s*│", text)
    assert [r[0] for r in rows] == ["2", "1"], text  # batched, then one at a time
    for _, requests, failed, rps in rows:
        assert int(requests) > 0 and int(failed) == 0 and float(rps) > 0
    rss = re.findall(r"max_batch=(\d+): resident memory (\d+) MiB at the start, (\d+) MiB at its peak, (\d+) MiB at "
                     r"the end", text)
    assert [r[0] for r in rss] == ["2", "1"], text
    for _, start, peak, end in rss:  # the process's, MiB
        assert 50 < int(start) <= int(peak) and int(end) <= int(peak)
    assert "batching speed-up" in text
