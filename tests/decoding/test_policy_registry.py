"""The policy registry: a policy's declared knobs are validated, saved and offered as CLI options from its
own declaration, so a new policy is one class and one registry entry."""

import pytest
import torch
import typer
from typer.testing import CliRunner

from policy_helpers import TopKPolicy
from unmask.cli.common import decode_options, policy_options
from unmask.decoding.options import DecodeOptions, OptionsError, generation_defaults, save_generation_defaults
from unmask.decoding.policies import POLICIES, declared_params, make_policy


@pytest.fixture
def topk(monkeypatch):
    monkeypatch.setitem(POLICIES, TopKPolicy.name, TopKPolicy)
    return TopKPolicy


def test_every_builtin_knob_is_declared_once_with_the_options_default():
    declared = declared_params()
    assert set(declared) == {"threshold", "factor", "entropy_bound"}
    for name, param in declared.items():
        assert getattr(DecodeOptions(), name) == param.default
    assert {cls.name: [p.name for p in cls.params] for cls in POLICIES.values()} == {
        "fixed": [], "threshold": ["threshold"], "factor": ["factor"], "eb": ["entropy_bound"],
        "leftmost": ["threshold"], "verify": []}


@pytest.mark.parametrize("options, words", [
    (dict(threshold=1.5), ["threshold must be in (0, 1], got 1.5 (threshold policy)"]),
    (dict(policy="fixed", threshold=0.0), ["threshold must be", "(threshold and leftmost policies)"]),
    (dict(policy="factor", factor=0), ["factor must be > 0, got 0 (factor policy)"]),
    (dict(policy="eb", entropy_bound=-0.5), ["entropy_bound must be >= 0, got -0.5 (eb policy)"]),
    (dict(threshold=float("nan")), ["threshold", "finite"]),
    (dict(policy_params={"nope": 1}), ["'nope'", "no registered policy's own parameter"]),
])
def test_a_bad_knob_is_one_error_naming_the_policy_and_the_knob(options, words):
    with pytest.raises(OptionsError) as e:
        DecodeOptions(**options)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_new_policy_brings_its_own_knob(topk, tmp_path):
    opts = DecodeOptions(policy="topk").replace(top_k_commit=3)
    assert opts.policy_params == {"top_k_commit": 3} and opts.param("top_k_commit") == 3
    assert DecodeOptions(policy="topk").param("top_k_commit") == 2  # the declared default
    conf = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7], dtype=torch.float64)
    commit = make_policy(opts).select(conf, torch.ones(5, dtype=torch.bool), 0)
    assert commit.tolist() == [False, True, False, True, True]
    with pytest.raises(OptionsError, match="top_k_commit must be in \\[1, 8\\], got 9 \\(topk policy\\)"):
        opts.replace(top_k_commit=9)
    with pytest.raises(OptionsError, match="must be an integer"):
        opts.replace(top_k_commit=2.5)
    save_generation_defaults(opts, tmp_path)  # a top-level key of generation_config.json, as threshold is
    assert generation_defaults(tmp_path) == opts


def test_an_unregistered_policy_is_refused():
    with pytest.raises(OptionsError, match="policy must be one of fixed, threshold"):
        DecodeOptions(policy="topk")


def test_cli_options_come_from_the_declarations(topk):
    seen = []
    app = typer.Typer()

    @app.command()
    @policy_options
    def run(max_new_tokens: int = 8, **policy) -> None:
        seen.append(decode_options(max_new_tokens=max_new_tokens, **policy))

    runner = CliRunner(env={"COLUMNS": "200"})
    help_text = " ".join(runner.invoke(app, ["--help"]).output.split())
    for words in ("--policy", "topk", "--top-k-commit", "positions committed a step (topk policy; in [1, 8])",
                  "--threshold", "--factor", "--entropy-bound"):
        assert words in help_text, words
    assert runner.invoke(app, ["--policy", "topk", "--top-k-commit", "4"]).exit_code == 0
    assert seen[-1].policy == "topk" and seen[-1].param("top_k_commit") == 4
    assert runner.invoke(app, ["--threshold", "0.5"]).exit_code == 0 and seen[-1].threshold == 0.5
    bad = runner.invoke(app, ["--policy", "topk", "--top-k-commit", "0"])
    assert bad.exit_code == 2 and "top_k_commit must be in [1, 8], got 0 (topk policy)" in " ".join(bad.output.split())
    bad = runner.invoke(app, ["--policy", "best"])
    assert bad.exit_code == 2 and "policy must be one of" in " ".join(bad.output.split())
