"""The lm-eval adapter: ELBO loglikelihood of a continuation, greedy check, rolling, generate_until, registration.
lm-eval itself is not needed: requests are plain objects with `.args`, as the harness passes them."""

from __future__ import annotations

import importlib
import itertools
import json
import math
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

from conftest import tiny_model
from published_checkpoints import qwen2_checkpoint
import unmask
from unmask.cli.main import main
from unmask.diffusion.objective import token_nll
from unmask.eval import lm_eval as adapter
from unmask.eval.lm_eval import UnmaskLM, continuation_nll, greedy_matches
from unmask.model.config import ModelConfig
from unmask.pipeline import Pipeline


@dataclass
class Req:
    args: tuple


class FixedLogits(nn.Module):
    """Predicts the same distribution at every position: token 5 likely, the rest uniform."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, mask_id=15, eos_id=14, pad_id=14)
        self.output = nn.Linear(8, 16, bias=False)
        self.logits = torch.zeros(16)
        self.logits[5] = 3.0

    def forward(self, input_ids, **kw):
        return self.logits.expand(*input_ids.shape, -1).clone()


def test_elbo_weighting_is_exact_for_a_context_free_model():
    """Position-independent predictions of a repeated token: every mask of l tokens gives (L/l) * l * nll = L * nll,
    so the estimate has no Monte-Carlo noise and any other weighting would show."""
    model = FixedLogits()
    logp = model.logits.log_softmax(-1)
    gen = torch.Generator().manual_seed(0)
    for target in ([5, 5], [7, 7, 7]):
        est = continuation_nll(model, [1, 2, 3], target, mc_samples=7, batch_size=3, generator=gen)
        assert est == pytest.approx(-sum(logp[t].item() for t in target), rel=1e-5)
    # mixed tokens: unbiased, so the mean over many masks still equals the exact -log p
    est = continuation_nll(model, [1, 2, 3], [7, 3, 5], mc_samples=2000, batch_size=500, generator=gen)
    assert est == pytest.approx(-sum(logp[t].item() for t in (7, 3, 5)), rel=0.03)
    assert greedy_matches(model, [1, 2], [5, 5, 5]) and not greedy_matches(model, [1, 2], [5, 7])


def test_mc_estimate_converges_to_the_exact_masked_elbo(tokenizer):
    """Enumerate every mask of a 3-token continuation: the MC estimator's mean must match it."""
    torch.manual_seed(0)
    model = tiny_model(tokenizer, seed=3)
    prefix, target = [20, 31, 42, 53], [64, 75, 86]
    L, P = len(target), len(prefix)
    x0 = torch.tensor([prefix + target])
    exact = 0.0
    with torch.no_grad():
        for l in range(1, L + 1):
            subsets = list(itertools.combinations(range(L), l))
            for s in subsets:
                x_t = x0.clone()
                x_t[0, [P + i for i in s]] = model.config.mask_id
                nll = token_nll(model(x_t), x0)[0]
                exact += (1 / L) * (1 / len(subsets)) * (L / l) * sum(nll[P + i].item() for i in s)
    est = continuation_nll(model, prefix, target, mc_samples=600, batch_size=200,
                           generator=torch.Generator().manual_seed(1))
    assert est == pytest.approx(exact, rel=0.03)
    # only the continuation is masked: changing the prefix changes the estimate
    other = continuation_nll(model, [99, 98, 97, 96], target, mc_samples=600, batch_size=200,
                             generator=torch.Generator().manual_seed(1))
    assert abs(other - est) > 1e-3


def test_causal_twin_is_scored_exactly(tokenizer):
    model = tiny_model(tokenizer, attention="causal")
    prefix, target = [20, 31, 42], [64, 75]
    with torch.no_grad():
        logp = model(torch.tensor([prefix + target]))[0].log_softmax(-1)
    exact = -(logp[2, 64] + logp[3, 75]).item()
    assert continuation_nll(model, prefix, target) == pytest.approx(exact, rel=1e-5)


def test_adapter_methods_with_plain_requests(tiny_pipeline):
    lm = UnmaskLM(pipeline=tiny_pipeline, mc_samples=8, seed=0)
    reqs = [Req(("def add(a, b):\n    return", " a + b")), Req(("import os\n", "import sys"))]
    res = lm.loglikelihood(reqs)
    assert len(res) == 2 and all(isinstance(g, bool) for _, g in res)
    assert all(math.isfinite(ll) and ll < 0 for ll, _ in res)
    again = UnmaskLM(pipeline=tiny_pipeline, mc_samples=8, seed=0).loglikelihood(reqs)
    assert [r[0] for r in again] == [r[0] for r in res]  # seeded: reproducible
    rolling = lm.loglikelihood_rolling([Req(("x = 1\ny = 2\n",))])
    assert len(rolling) == 1 and math.isfinite(rolling[0]) and rolling[0] < 0


def test_encode_pair_moves_trailing_space_into_the_continuation(tiny_pipeline):
    lm = UnmaskLM(pipeline=tiny_pipeline)
    ctx, cont = lm._encode_pair("x = ", "1")
    tok = tiny_pipeline.tokenizer
    assert tok.decode(ctx) == "x =" and tok.decode(cont) == " 1"


def test_generate_until_cuts_at_until_and_respects_max_gen_toks(tiny_pipeline, monkeypatch):
    import unmask.eval.lm_eval as caller  # the module that calls generate_many

    lm = UnmaskLM(pipeline=tiny_pipeline, seed=0, block_length=8)
    seen = []
    many = caller.generate_many

    def spy(pipe, prompts, options, **kw):
        for i, result in many(pipe, prompts, options, **kw):
            seen.append((options[i], result))
            yield i, result

    monkeypatch.setattr(caller, "generate_many", spy)
    free = lm.generate_until([Req(("def f(x):\n", {"until": [], "max_gen_toks": 16}))])[0]
    assert seen[0][0].max_new_tokens == 16 and 0 < len(seen[0][1].tokens) <= 16
    stop = free[3:6]
    assert stop and free.find(stop) >= 0
    cut = lm.generate_until([Req(("def f(x):\n", {"until": [stop], "max_gen_toks": 16, "do_sample": False}))])[0]
    assert cut == free[: free.find(stop)]


def test_create_from_arg_string(saved_model_dir):
    lm = UnmaskLM.create_from_arg_string(f"pretrained={saved_model_dir},mc_samples=4,policy=fixed,threshold=0.8,"
                                         "greedy_check=false", {"batch_size": 2, "device": "cpu"})
    assert (lm.mc_samples, lm.batch_size, lm.greedy_check) == (4, 2, False)
    assert (lm.options.policy, lm.options.threshold) == ("fixed", 0.8)


def test_block_diffusion_checkpoint_loglikelihood(tmp_path):
    qwen2_checkpoint(tmp_path / "bq", kind="fast_dllm", bd_size=4)
    lm = UnmaskLM(pretrained=str(tmp_path / "bq"), device="cpu", mc_samples=4, greedy_check=False)
    (ll, _), = lm.loglikelihood([Req(("def f(x):\n    return", " x + 1\n"))])
    assert math.isfinite(ll) and ll < 0


def test_registers_with_the_harness_when_installed(monkeypatch):
    """With lm-eval importable, the class subclasses its LM and registers as "unmask" (a stand-in module here;
    the real harness is optional and heavy)."""
    registry = {}
    lm_eval = types.ModuleType("lm_eval")
    api = types.ModuleType("lm_eval.api")
    model_mod = types.ModuleType("lm_eval.api.model")
    registry_mod = types.ModuleType("lm_eval.api.registry")

    class LM:
        def __init__(self):
            self.initialised = True

    def register_model(*names):
        def deco(cls):
            assert issubclass(cls, LM)
            registry.update({n: cls for n in names})
            return cls
        return deco

    model_mod.LM, registry_mod.register_model = LM, register_model
    for name, mod in (("lm_eval", lm_eval), ("lm_eval.api", api), ("lm_eval.api.model", model_mod),
                      ("lm_eval.api.registry", registry_mod)):
        monkeypatch.setitem(sys.modules, name, mod)
    try:
        reloaded = importlib.reload(adapter)
        assert registry["unmask"] is reloaded.UnmaskLM and issubclass(reloaded.UnmaskLM, LM)
    finally:
        monkeypatch.undo()
        importlib.reload(adapter)


def test_real_harness_registry():
    pytest.importorskip("lm_eval.api.registry")
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    cls = get_model("unmask")
    assert cls.__name__ == "UnmaskLM" and issubclass(cls, LM)


def write_local_tasks(folder, word: str, expected: str, gen_args: dict) -> None:
    """Two harness tasks read from local json files (nothing from the hub): a multiple-choice one whose right
    answers are the continuations made of `word`, and a generation one whose target is `expected`."""
    rows = {"mc": [{"q": "a =", "choices": [word * 2, " 1 + 2"], "answer": 0},
                   {"q": "b =", "choices": [" [None]", word * 3], "answer": 1}],
            "gen": [{"prompt": "x = 1\ny =", "target": expected}]}
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: unmask_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "gen.yaml").write_text(
        f"task: unmask_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        f"generation_kwargs: {json.dumps(gen_args)}\nmetric_list:\n  - metric: exact_match\n")


def rig_to_prefer_a_word(pipe) -> str:
    """Make every position favour one single-token word; return it."""
    tok = pipe.tokenizer
    word = next(w for w in (" self", " return", " def", " if") if len(tok.encode(w)) == 1)
    liked = tok.encode(word)[0]

    def prefer(module, args, output):
        output = output.clone()
        output[..., liked] += 30.0
        return output

    pipe.model.output.register_forward_hook(prefer)
    return word


GEN_ARGS = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}


@pytest.mark.slow
def test_harness_runs_local_tasks_end_to_end(tiny_pipeline, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate on two local tasks: multiple choice scored by the ELBO, generation by the engine.
    The model is rigged to prefer one token, so the answers are known."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    word = rig_to_prefer_a_word(tiny_pipeline)
    lm = UnmaskLM(pipeline=tiny_pipeline, mc_samples=4, seed=0)
    expected = lm.generate_until([Req(("x = 1\ny =", GEN_ARGS))])[0]
    assert word.strip() in expected  # the rig works: generation is dominated by the liked token
    write_local_tasks(tmp_path, word, expected, GEN_ARGS)
    out = lm_eval.simple_evaluate(model=lm, tasks=["unmask_mc", "unmask_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)), bootstrap_iters=0)
    assert out["results"]["unmask_mc"]["acc,none"] == 1.0  # the liked continuation wins both questions
    assert out["results"]["unmask_gen"]["exact_match,none"] == 1.0
    assert out["samples"]["unmask_gen"][0]["resps"] == [[expected]]


@pytest.mark.slow
def test_harness_command_line_sees_the_unmask_model(saved_model_dir, tmp_path, monkeypatch):
    """`unmask eval lm-eval ARGS` is lm-eval's CLI with "unmask" registered (a bare `lm_eval --model unmask`
    cannot find it): it loads the folder from --model_args and scores as the Python API does."""
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_local_tasks(tmp_path, " self", "", GEN_ARGS)
    lm = UnmaskLM(pretrained=str(saved_model_dir), device="cpu", mc_samples=4, seed=0)
    direct = lm_eval.simple_evaluate(model=lm, tasks=["unmask_mc"], bootstrap_iters=0, log_samples=True,
                                     task_manager=TaskManager(include_path=str(tmp_path)))
    out = tmp_path / "results"
    assert main(["eval", "lm-eval", "--model", "unmask", "--model_args",
                 f"pretrained={saved_model_dir},mc_samples=4,seed=0,device=cpu", "--tasks", "unmask_mc",
                 "--include_path", str(tmp_path), "--output_path", str(out),
                 "--log_samples"]) == 0
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert written["config"]["model"] == "unmask"
    assert written["results"]["unmask_mc"]["acc,none"] == direct["results"]["unmask_mc"]["acc,none"]
    samples = [json.loads(line) for line in next(out.rglob("samples_unmask_mc_*.jsonl")).read_text().splitlines()]
    ours = [[float(r[0][0]) for r in s["resps"]] for s in samples]  # each choice's ELBO log-likelihood
    theirs = [[float(r[0][0]) for r in s["resps"]] for s in direct["samples"]["unmask_mc"]]
    assert [x for row in ours for x in row] == pytest.approx([x for row in theirs for x in row], rel=1e-6)


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_generate_until_batches_requests_with_the_answers_of_one_at_a_time(tokenizer, attention):
    pipe = Pipeline(tiny_model(tokenizer, attention=attention), tokenizer)
    lm = UnmaskLM(pipeline=pipe, seed=0, block_length=8, batch_size=2)
    requests = [Req(("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 12})),
                Req(("import os", {"until": [], "max_gen_toks": 8})),
                Req(("class A:", {"until": [], "max_gen_toks": 10, "temperature": 0.7})),
                Req(("x = ", {"until": ["y"], "max_gen_toks": 6}))]
    batched = lm.generate_until(requests)
    alone = [UnmaskLM(pipeline=pipe, seed=0, block_length=8, batch_size=1).generate_until([r])[0] for r in requests]
    assert batched == alone  # each request keeps its settings and its seed (the sampled one too)
    assert len(set(batched)) == 4
