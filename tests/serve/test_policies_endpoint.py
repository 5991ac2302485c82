"""GET /v1/policies and the request schema follow the policy registry: a policy registered in Python is
listed, documented and accepted with its own knob, and a bad value of a knob is a 422 naming both."""

import pytest
from fastapi.testclient import TestClient

from policy_helpers import TopKPolicy
from unmask.decoding.policies import POLICIES
from unmask.serve.app import create_app

FAST = {"max_tokens": 6, "block_length": 6, "temperature": 0}


@pytest.fixture
def client(tiny_pipeline, monkeypatch):
    monkeypatch.setitem(POLICIES, TopKPolicy.name, TopKPolicy)
    with TestClient(create_app(tiny_pipeline, model_name="tiny")) as c:
        yield c


def test_policies_are_listed_with_their_knobs(client):
    body = client.get("/v1/policies").json()
    by_name = {p["name"]: p for p in body["data"]}
    assert list(by_name) == list(POLICIES) and "topk" in by_name and body["default"] == "threshold"
    (threshold,) = by_name["threshold"]["params"]
    assert threshold == {"name": "threshold", "type": "float", "default": 0.9, "range": "in (0, 1]",
                         "help": threshold["help"], "gt": 0.0, "le": 1.0}
    assert by_name["topk"]["params"][0]["name"] == "top_k_commit" and by_name["fixed"]["params"] == []
    card = client.get("/v1/models").json()["data"][0]["defaults"]
    assert card["threshold"] == 0.9 and card["top_k_commit"] == 2


def test_the_request_schema_names_every_policy_and_knob(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "topk" in schema["policy"]["enum"] and schema["top_k_commit"]["maximum"] == 8
    assert schema["threshold"]["exclusiveMinimum"] == 0 and "knobs" not in schema


def test_a_new_policy_decodes_with_its_knob(client):
    r = client.post("/v1/completions", json={"prompt": "def f(x):", "policy": "topk", "top_k_commit": 3, **FAST})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["steps"] == 2  # 6 positions, 3 a step


@pytest.mark.parametrize("body, param, message", [
    ({"policy": "topk", "top_k_commit": 0}, "top_k_commit", "top_k_commit must be in [1, 8], got 0 (topk policy)"),
    ({"policy": "topk", "top_k_commit": 1.5}, "top_k_commit", "top_k_commit: Input should be a valid integer"),
    ({"policy": "eb", "entropy_bound": -1}, "entropy_bound", "entropy_bound must be >= 0, got -1 (eb policy)"),
    ({"policy": "best"}, "policy", "policy: must be one of fixed, threshold, factor, eb, leftmost, verify, topk"),
    ({"knobs": {"threshold": 0.5}}, "knobs", "knobs: not a request field"),
])
def test_a_bad_knob_is_a_422_naming_it(client, body, param, message):
    r = client.post("/v1/completions", json={"prompt": "x", **body})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == param and message in r.json()["error"]["message"], r.text
