"""The server driven by the official `openai` Python client over real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from unmask.serve.app import create_app  # noqa: E402
from unmask.serve.runner import BackgroundServer  # noqa: E402

FAST = {"steps": 4, "block_length": 8}  # our decoding options: the client's extra_body


@pytest.fixture
def served(tiny_pipeline):
    """(OpenAI client, app) for the tiny model served on a free loopback port; no retries, so a 429 shows."""
    app = create_app(tiny_pipeline, model_name="tiny")
    with BackgroundServer(app) as srv, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0,
                                                     timeout=60) as client:
        yield client, app


def test_the_openai_client_gets_what_it_expects(served, tiny_pipeline):
    client, _ = served
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"

    infill = client.completions.create(model="tiny", prompt="def add(a, b):\n    return ", max_tokens=8,
                                       suffix="\n\nprint(add(1, 2))\n", logprobs=2, extra_body=FAST)
    choice = infill.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text and infill.usage.completion_tokens <= 8
    assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs)

    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Sort a list"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8, extra_body=FAST)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=8,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=FAST))
    *content, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in content) == chat.choices[0].message.content
    assert last.choices == [] and last.usage.completion_tokens == chat.usage.completion_tokens

    text = "def average(values):\n    return sum(values) / len(vaules)\n"
    start = text.index("vaules")
    edit = client.post("/edits", cast_to=object, body={"input": text, "spans": [[start, start + 6]], "max_tokens": 8,
                                                       "steps": 4})
    new = edit["choices"][0]["text"]
    assert new.startswith(text[:start]) and new.endswith(text[start + 6:])


def test_the_openai_client_maps_each_error(served):
    client, app = served
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**ask, tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.status_code == 400 and e.value.param == "tools"
    assert "tools are not supported by this server" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.param == "model"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="x" * 2_100_000, max_tokens=1)
    assert e.value.status_code == 413 and e.value.param == "body"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(**ask, extra_body={"max_tokens": "8"})
    assert e.value.param == "max_tokens"
    app.state.server.worker.max_jobs = 0  # an edit queue that holds no edit: every edit is turned away
    with pytest.raises(openai.RateLimitError) as e:
        client.post("/edits", cast_to=object, body={"input": "x = 1\n", "mode": "auto"})
    assert "server busy" in e.value.message
    assert e.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("healing", [True, False])
def test_max_tokens_means_what_the_pipeline_means(served, tiny_pipeline, healing):
    """The official client's max_tokens and completion_tokens match the pipeline's for the same request."""
    from unmask.decoding.options import DecodeOptions

    client, _ = served
    prompt = 'def f(x):\n    """Return x."""\n'
    want = tiny_pipeline.generate(prompt, DecodeOptions(max_new_tokens=8, steps=4, block_length=8, policy="fixed",
                                                        heal=healing))
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                    extra_body={**FAST, "policy": "fixed", "heal": healing})
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == want.completion_tokens <= 8
