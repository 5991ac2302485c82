"""Trainer: loss goes down in every attention mode, the ELBO improves, resume is exact, init_from and SFT work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_model
from train_helpers import TINY_MODEL, make_corpus, one_thread, tiny_train_config  # noqa: F401  (one_thread: autouse)
from unmask.eval.elbo import evaluate_bits_per_byte, token_stream
from unmask.train.trainer import Trainer


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, corpus_texts, tokenizer) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), corpus_texts, tokenizer)


def losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.history if "loss" in row]


@pytest.mark.parametrize("mode,attention", [("diffusion", "bidirectional"), ("diffusion", "block_causal"),
                                            ("ar", "causal")])
def test_loss_decreases_in_every_attention_mode(tmp_path, corpus_dir, mode, attention):
    model = {"attention": attention, "max_seq_len": 64}
    cfg = tiny_train_config(corpus_dir, tmp_path / "run", mode=mode, model=model, steps=40)
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    ls = losses(trainer)
    assert len(ls) == 40
    first, last = np.mean(ls[:5]), np.mean(ls[-5:])
    assert last < first - 0.5, (first, last)


def test_trained_elbo_beats_untrained_and_output_loads(tmp_path, corpus_dir, corpus_texts, tokenizer):
    import unmask

    cfg = tiny_train_config(corpus_dir, tmp_path / "run", steps=60, eval_interval=30)
    trainer = Trainer(cfg, progress=False)
    metrics = trainer.fit()
    evals = [r["val_bpb"] for r in trainer.history if "val_bpb" in r]
    assert len(evals) == 2 and metrics["val_bpb"] == evals[-1]

    pipe = unmask.load(tmp_path / "run", device="cpu")  # the output folder is a model folder
    assert pipe.config.attention == "bidirectional" and pipe.tokenizer.vocab_size == tokenizer.vocab_size
    x = torch.randint(10, 500, (1, 16))
    with torch.no_grad():
        assert torch.allclose(pipe.model(x), trainer.model.eval()(x), atol=1e-5)

    stream = token_stream(corpus_texts[16:18], tokenizer)
    kw = dict(seq_len=32, n_samples=2, max_windows=16, seed=0)
    trained = evaluate_bits_per_byte(pipe.model, tokenizer, stream, **kw)
    untrained = evaluate_bits_per_byte(tiny_model(tokenizer, seed=1, **TINY_MODEL), tokenizer, stream, **kw)
    assert trained.bits_per_byte < untrained.bits_per_byte - 0.5, (trained, untrained)


def test_resume_continues_with_identical_losses(tmp_path, corpus_dir):
    cfg = tiny_train_config(corpus_dir, tmp_path / "run", steps=6, checkpoint_interval=3, keep_checkpoints=3,
                            micro_batch_size=4)  # grad accumulation too
    full = Trainer(cfg, progress=False)
    full.fit()
    expected = losses(full)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    assert (ckpt / "trainer.pt").exists() and (ckpt / "config.json").exists()

    # a new trainer (as after a kill) resumes from step 3 and takes exactly the same steps 4..6
    resumed = Trainer(tiny_train_config(corpus_dir, tmp_path / "run", steps=6, checkpoint_interval=3,
                                        micro_batch_size=4), resume=ckpt, progress=False)
    assert resumed.step == 3
    resumed.fit()
    assert losses(resumed)[3:] == expected[3:]
    # log.jsonl is the checkpoint's history plus the resumed steps: the steps after the checkpoint, which the
    # interrupted run had logged too, appear once
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert logged == json.loads(json.dumps(resumed.history))


def test_resume_latest_and_no_checkpoint(tmp_path, corpus_dir):
    cfg = tiny_train_config(corpus_dir, tmp_path / "run", steps=4, checkpoint_interval=2, keep_checkpoints=1)
    Trainer(cfg, progress=False).fit()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000004"]
    again = Trainer(cfg, resume=True, progress=False)
    assert again.step == 4
    assert Trainer(tiny_train_config(corpus_dir, tmp_path / "other", steps=4), resume=True, progress=False).step == 0


def test_init_from_ar_twin_adapts_to_diffusion(tmp_path, corpus_dir):
    ar = Trainer(tiny_train_config(corpus_dir, tmp_path / "ar", mode="ar", model={"attention": "causal"}, steps=3),
                 progress=False)
    ar.fit()
    cfg = tiny_train_config(corpus_dir, tmp_path / "dllm", steps=3, init_from=str(tmp_path / "ar"),
                            model={"attention": "block_causal", "logits_shift": True, "block_size": 8})
    cfg.model.pop("dim")  # shape comes from the source model; only the listed keys change
    adapted = Trainer(cfg, progress=False)
    assert adapted.model.config.attention == "block_causal" and adapted.model.config.logits_shift
    for (name, a), b in zip(ar.model.state_dict().items(), adapted.model.state_dict().values()):
        assert torch.equal(a, b), name
    adapted.fit()
    assert all(np.isfinite(losses(adapted)))


def test_sft_mode_trains_on_prompt_answer_pairs(tmp_path, tokenizer):
    rows = [{"prompt": f"def add_{i}(a, b):\n", "answer": f"    return a + b + {i}\n"} for i in range(24)]
    rows += [{"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer.save(tmp_path / "tok")
    cfg = tiny_train_config(tmp_path, tmp_path / "run", mode="sft", steps=25,
                            data={"corpus": None, "train": str(data), "val": str(data), "tokenizer": str(tmp_path / "tok")})
    trainer = Trainer(cfg, progress=False)
    assert trainer.train_data.n == 25
    first = trainer.evaluate()["val_loss"]
    trainer.fit()
    assert trainer.evaluate()["val_loss"] < first


def test_step_budget_times_the_first_steps_then_plans_the_rest():
    from unmask.train.schedule import StepBudget

    budget = StepBudget(minutes=1.0, warmup_steps=10, skip=2, timed=4)  # times steps 3..6
    plans = [budget.plan(step, 5.0 if step <= 2 else 0.5, spent) for step, spent in
             ((1, 5.0), (2, 10.0), (3, 10.5), (4, 11.0), (5, 11.5), (6, 12.0))]
    assert plans[:5] == [None] * 5
    assert plans[5] == 6 + int((60 - 12.0) / 0.5)  # compile time counts as spent, not as the pace


class FakeClock:
    """Every reading advances 0.5 s: each training step 'takes' exactly 0.5 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 0.5
        return self.now


def test_minutes_budget_plans_steps_and_resume_keeps_the_plan(tmp_path, corpus_dir, monkeypatch):
    import unmask.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "time", FakeClock())
    over = dict(minutes=0.5, checkpoint_interval=20, keep_checkpoints=5, optim={"schedule": "cosine"})
    trainer = Trainer(tiny_train_config(corpus_dir, tmp_path / "run", **over), progress=False)
    trainer.fit()
    plan = next(r for r in trainer.history if "planned_steps" in r)
    # warmup 5: 3 untimed steps, 3 timed; 30 s budget, 3 s spent after 6 steps at 0.5 s/step -> 60 steps
    assert plan == {"step": 6, "planned_steps": 60, "seconds_per_step": 0.5}
    assert trainer.step == trainer.cfg.steps == 60
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(3e-3 * 0.1)  # the cosine reached its floor
    assert "steps: 60" in (tmp_path / "run" / "train_config.yaml").read_text()

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000020"
    resumed = Trainer(tiny_train_config(corpus_dir, tmp_path / "run", **over), resume=ckpt, progress=False)
    assert resumed.step == 20 and resumed.cfg.steps == 60 and resumed.budget is None
    assert resumed.train_seconds == pytest.approx(10.0)


def test_minutes_must_be_positive(tmp_path, corpus_dir):
    from unmask.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="minutes must be > 0"):
        Trainer(tiny_train_config(corpus_dir, tmp_path / "run", minutes=0), progress=False)


@pytest.mark.parametrize("over,message", [
    ({"log_interval": 0}, "log_interval must be >= 1"),
    ({"eval_samples": 0}, "eval_samples must be >= 1"),
    ({"checkpoint_interval": -1}, "checkpoint_interval must be >= 0"),
    ({"optim": {"decay_fraction": 2.0}}, "decay_fraction must be in"),
    ({"optim": {"warmup_steps": -5}}, "warmup_steps must be >= 0"),
    ({"dtype": "float77"}, "dtype must be one of"),
    ({"save_dtype": "int8"}, "save_dtype must be one of"),  # not after the whole run, when saving
])
def test_bad_values_fail_before_training(tmp_path, corpus_dir, over, message):
    from unmask.train.config import TrainConfigError

    with pytest.raises(TrainConfigError, match=message):
        tiny_train_config(corpus_dir, tmp_path / "run", **over)
    assert not (tmp_path / "run").exists()


def test_missing_init_from_is_named(tmp_path, corpus_dir):
    from unmask.train.config import TrainConfigError

    # not "no tokenizer.json in ..." (the tokenizer defaults to init_from's): the folder itself is missing
    with pytest.raises(TrainConfigError, match="model folder not found: .*nope"):
        Trainer(tiny_train_config(corpus_dir, tmp_path / "run", init_from=str(tmp_path / "nope")), progress=False)
