import dataclasses
import json

import pytest
import torch

import unmask

from conftest import tiny_model
from unmask.diffusion.objective import masked_diffusion_loss
from unmask.pipeline import Pipeline
from unmask.tokenizer import Tokenizer
from unmask.train.config import TrainConfig, TrainConfigError
from unmask.train.distill import (DistillConfig, Distiller, certainty_forcing_loss, collect_trajectories, distill_config,
                                  divergence)


@pytest.fixture(scope="module")
def trained_teacher(tokenizer, corpus_texts):
    """A teacher with real context dependence: 80 masked-diffusion steps on stdlib source."""
    model = tiny_model(tokenizer, seed=3).train()
    ids = torch.tensor([i for t in corpus_texts[:10] for i in tokenizer.encode(t)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        starts = torch.randint(0, len(ids) - 64, (8,), generator=gen)
        loss = masked_diffusion_loss(model, torch.stack([ids[s : s + 64] for s in starts]), generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture
def teacher_and_data(tmp_path, tokenizer, corpus_texts, trained_teacher):
    teacher = tmp_path / "teacher"
    Pipeline(trained_teacher, tokenizer).save(teacher)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:20]))
    return teacher, data


def make(tmp_path, teacher, data, dcfg, out="student", **over):
    base = TrainConfig(seq_len=64, batch_size=8, eval_interval=0, checkpoint_interval=0, log_interval=1, seed=0)
    base.optim.lr = 1e-3
    base.optim.warmup_steps = 2
    for k, v in over.items():
        setattr(base, k, v)
    return distill_config(teacher, tmp_path / out, str(data), dcfg, base)


def test_sdtt_round_lowers_the_few_step_loss(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    dcfg = DistillConfig(method="sdtt", rounds=1, steps_per_round=40, teacher_steps=2)
    d = Distiller(make(tmp_path, teacher, data, dcfg), dcfg, progress=False)
    before = d.few_step_loss()
    d.fit()
    after = d.few_step_loss()
    assert after < 0.9 * before, (before, after)
    assert (tmp_path / "student" / "rounds" / "round_0" / "config.json").exists()
    assert (tmp_path / "student" / "config.json").exists()


def test_sdtt_next_round_uses_the_previous_student_as_teacher(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    dcfg = DistillConfig(method="sdtt", rounds=2, steps_per_round=3, teacher_steps=8)
    d = Distiller(make(tmp_path, teacher, data, dcfg), dcfg, progress=False)
    for _ in range(3):
        d.train_step()
    assert d.round == 1 and d.teacher_steps(1) == 4
    t = d.teacher()
    for a, b in zip(t.parameters(), d.model.parameters()):
        assert torch.equal(a, b)  # the round-0 student, frozen


def test_distill_resume_continues_exactly(tmp_path, teacher_and_data):
    teacher, data = teacher_and_data
    dcfg = DistillConfig(method="sdtt", rounds=2, steps_per_round=3, teacher_steps=8)
    straight = Distiller(make(tmp_path, teacher, data, dcfg, out="a"), dcfg, progress=False)
    losses = [straight.train_step() for _ in range(5)]
    first = Distiller(make(tmp_path, teacher, data, dcfg, out="b"), dcfg, progress=False)
    for _ in range(4):
        first.train_step()
    first.save_checkpoint()
    del first
    resumed = Distiller(make(tmp_path, teacher, data, dcfg, out="b"), dcfg, resume=True, progress=False)
    assert resumed.step == 4 and resumed.round == 1
    assert resumed.train_step() == pytest.approx(losses[4], rel=1e-5)


def test_trajectory_round_learns_the_teachers_answers(tmp_path, teacher_and_data, corpus_texts):
    teacher, _ = teacher_and_data
    dcfg = DistillConfig(method="trajectory", prompts=6, prompt_tokens=24, answer_tokens=16,
                         teacher_temperature=1.0, teacher_top_p=0.95)
    traj = tmp_path / "trajectories.jsonl"
    assert collect_trajectories(teacher, corpus_texts[:20], dcfg, traj, progress=False) == 6
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    assert all(r["prompt"] and r["answer"] for r in rows)
    greedy = tmp_path / "greedy.jsonl"
    collect_trajectories(teacher, corpus_texts[:20], DistillConfig(method="trajectory", prompts=6, prompt_tokens=24,
                                                                   answer_tokens=16), greedy, progress=False)
    assert [r["prompt"] for r in rows] == [json.loads(x)["prompt"] for x in greedy.read_text().splitlines()]
    assert rows != [json.loads(x) for x in greedy.read_text().splitlines()]  # sampled answers differ
    d = Distiller(make(tmp_path, teacher, traj, dcfg, steps=30, mode="sft", seq_len=48), dcfg, progress=False)
    before = d.few_step_loss()
    d.fit()
    assert d.few_step_loss() < 0.8 * before


def test_function_prompts_get_answers_that_fill_their_rows(tmp_path, teacher_and_data, corpus_texts, tokenizer,
                                                           monkeypatch):
    teacher, _ = teacher_and_data
    import unmask.train.distill as caller  # the module that calls generate_many

    asked = []
    many = caller.generate_many

    def spy(pipe, prompts, options, **kw):
        asked.extend((len(pipe.encode(p)), o.max_new_tokens, o.frequency_penalty) for p, o in zip(prompts, options))
        return many(pipe, prompts, options, **kw)

    monkeypatch.setattr(caller, "generate_many", spy)
    dcfg = DistillConfig(method="trajectory", prompts=5, prompt_source="functions", prompt_tokens=48,
                         answer_tokens=16, teacher_frequency_penalty=0.5)
    traj = tmp_path / "functions.jsonl"
    assert collect_trajectories(teacher, corpus_texts, dcfg, traj, progress=False) == 5
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    assert all(r["prompt"].startswith(("def ", "async def ")) and '"""' in r["prompt"] for r in rows)
    assert [n for n, _, _ in asked] == [len(tokenizer.encode(r["prompt"])) for r in rows]
    assert max(n for n, _, _ in asked) <= 48 and len({n for n, _, _ in asked}) > 1
    # a shorter prompt gets a longer answer: every row is full, none ends in padding the teacher never wrote
    assert all(n + new == 64 and penalty == 0.5 for n, new, penalty in asked)
    assert distill_config(teacher, tmp_path / "s", str(traj), dcfg, TrainConfig(seq_len=512)).seq_len == 64


def test_answers_can_come_from_the_ar_twin(tmp_path, teacher_and_data, corpus_texts, tokenizer):
    """Sequence-level distillation: the AR twin's greedy answers, not the teacher's, become the rows."""
    teacher, _ = teacher_and_data
    twin = tmp_path / "twin"
    Pipeline(tiny_model(tokenizer, seed=7, attention="causal"), tokenizer).save(twin)
    dcfg = DistillConfig(method="trajectory", prompts=4, prompt_source="functions", prompt_tokens=48, answer_tokens=16,
                         answer_model=str(twin))
    traj = tmp_path / "from-twin.jsonl"
    assert collect_trajectories(teacher, corpus_texts[:20], dcfg, traj, progress=False) == 4
    rows = [json.loads(line) for line in traj.read_text().splitlines()]
    ar = unmask.load(twin)
    for r in rows:  # each answer is exactly the twin's greedy (healed) continuation of its prompt, filling the row
        alone = ar.generate(r["prompt"], max_new_tokens=64 - len(tokenizer.encode(r["prompt"])), temperature=0.0)
        assert r["answer"] == alone.text
    own = tmp_path / "own.jsonl"
    collect_trajectories(teacher, corpus_texts[:20], dataclasses.replace(dcfg, answer_model=None), own, progress=False)
    assert [json.loads(x)["answer"] for x in own.read_text().splitlines()] != [r["answer"] for r in rows]


def test_answer_model_with_another_tokenizer_is_refused(tmp_path, teacher_and_data, corpus_texts):
    teacher, _ = teacher_and_data
    other_tok = Tokenizer.train(corpus_texts[:30], vocab_size=300)
    other = tmp_path / "other"
    Pipeline(tiny_model(other_tok, attention="causal"), other_tok).save(other)
    dcfg = DistillConfig(method="trajectory", prompts=2, prompt_tokens=24, answer_tokens=16, answer_model=str(other))
    with pytest.raises(TrainConfigError, match="another tokenizer"):
        collect_trajectories(teacher, corpus_texts[:20], dcfg, tmp_path / "t.jsonl", progress=False)
    assert not (tmp_path / "t.jsonl").exists()


def test_certainty_forcing_only_counts_answer_tokens(tokenizer):
    model = tiny_model(tokenizer)
    x = torch.randint(10, 500, (2, 24))
    prompt_len = torch.tensor([24, 24])  # no answer at all: nothing to learn
    assert float(certainty_forcing_loss(model, x, prompt_len, 0.5, torch.Generator().manual_seed(0)).detach()) == 0.0
    loss = certainty_forcing_loss(model, x, torch.tensor([8, 12]), 0.5, torch.Generator().manual_seed(0))
    assert float(loss.detach()) > 0


def test_divergences_are_zero_only_for_equal_distributions():
    logits = torch.randn(1, 3, 7)
    p = logits.softmax(-1)
    for kind in ("kl", "reverse_kl"):
        assert divergence(logits, p, kind).abs().max() < 1e-5
        assert (divergence(logits, torch.roll(p, 1, -1), kind) > 1e-3).all()


def test_bad_distill_settings_are_clear():
    with pytest.raises(TrainConfigError, match="method"):
        DistillConfig(method="magic").validate()
    with pytest.raises(TrainConfigError, match="below 1"):
        DistillConfig(rounds=5, teacher_steps=8).validate()
    with pytest.raises(TrainConfigError, match="prompt source"):
        DistillConfig(method="trajectory", prompt_source="random").validate()
    with pytest.raises(TrainConfigError, match="entropy_weight must be >= 0"):
        DistillConfig(method="trajectory", entropy_weight=-0.5).validate()


@pytest.mark.parametrize("method", ["trajectory", "sdtt"])
def test_distill_command_end_to_end(tmp_path, capsys, teacher_and_data, method):
    from unmask.cli.main import main
    from unmask.pipeline import load

    teacher, data = teacher_and_data
    out = tmp_path / "student"

    def distill(steps: int, *more: str) -> int:
        common = ["distill", "--teacher", teacher, "--out", out, "--method", method, "--data", data, "--set",
                  "seq_len=48", "--set", "batch_size=4", "--set", "checkpoint_interval=1", "--set", "log_interval=1",
                  "--set", "device=cpu"]
        if method == "trajectory":
            common += ["--prompts", "4", "--prompt-tokens", "16", "--answer-tokens", "8", "--steps", steps,
                       "--teacher-temperature", "0.8", "--teacher-top-p", "0.9"]
        else:
            common += ["--rounds", "1", "--steps-per-round", steps, "--teacher-steps", "2"]
        return main([str(a) for a in common + list(more)])

    assert distill(2) == 0, capsys.readouterr().err
    assert "few-step loss" in capsys.readouterr().err
    assert load(out).config.attention == "bidirectional"
    if method == "trajectory":
        assert len((out / "trajectories.jsonl").read_text().splitlines()) == 4
    assert distill(3, "--resume") == 0, capsys.readouterr().err
    # resumed at step 3 from the step-2 checkpoint, not started again (the teacher is not asked again either)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3], steps
    assert "teacher answered" not in capsys.readouterr().err


def test_no_prompt_to_answer_is_a_clear_error(tmp_path, teacher_and_data):
    teacher, _ = teacher_and_data
    for source, texts, message in (("cut", ["x = 1\n"], "no document longer than 64"),
                                   ("functions", ["x = 1\n"], "no function with a docstring")):
        dcfg = DistillConfig(method="trajectory", prompt_source=source, prompt_tokens=64)
        with pytest.raises(TrainConfigError, match=message):
            collect_trajectories(teacher, texts, dcfg, tmp_path / "t.jsonl", progress=False)


def test_sdtt_summary_names_the_rounds_it_compares(teacher_and_data, tmp_path, capsys):
    """Two rounds: the summary's two losses are against different teachers, and it says so."""
    from unmask.cli.main import main

    teacher, data = teacher_and_data
    args = ["distill", "--teacher", teacher, "--out", tmp_path / "s", "--method", "sdtt", "--data", data,
            "--rounds", "2", "--steps-per-round", "1", "--teacher-steps", "4", "--set", "seq_len=48",
            "--set", "batch_size=4", "--set", "device=cpu"]
    assert main([str(a) for a in args]) == 0
    summary = " ".join(capsys.readouterr().err.split())
    assert "at the start of round 0" in summary and "at the end of round 1 (against that round's teacher)" in summary


def test_answers_from_is_refused_for_sdtt(teacher_and_data, tmp_path, capsys):
    from unmask.cli.main import main

    teacher, data = teacher_and_data
    args = ["distill", "--teacher", teacher, "--out", tmp_path / "s", "--method", "sdtt", "--data", data,
            "--answers-from", teacher]
    assert main([str(a) for a in args]) == 2
    assert "only trajectory distillation" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "s").exists()
