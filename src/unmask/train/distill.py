"""Step distillation: the same quality in far fewer denoising steps (REFERENCE.md §2).

sdtt        self-distillation through time. From clean data x0 and a noise level t, the teacher takes two
            ancestral steps of size dt (t -> t-dt -> t-2dt); the student, from the same x_t, must predict in
            one step what the teacher reaches in two (KL on the masked positions). Each round halves the
            teacher's step count and the student of round r becomes the teacher of round r+1.
trajectory  dParallel-style certainty forcing. The teacher answers prompts from the corpus (windows cut at
            random, or the signature + docstring of its functions); the student is trained on its own teacher's
            answers (SFT masking: prompt kept, answer masked) with cross-entropy plus an entropy penalty on
            masked tokens it already predicts right, so it becomes confident earlier and can decode with a
            lower threshold. The answers may come from another model with the same tokenizer
            (`answer_model`, e.g. the AR twin): sequence-level distillation, which gives the student one
            deterministic answer per prompt where a small teacher's own answers are loops. Every row is
            prompt + answer = prompt_tokens + answer_tokens tokens: a shorter (function) prompt gets a longer
            answer, so no row ends in EOS padding the teacher never wrote.

Both run on the training stack (`Trainer`): same checkpoints, `--resume`, torchrun, progress bar.
out_dir/rounds/round_R/ holds the student at the end of round R (the teacher of round R+1).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rich.console import Console

import unmask
from unmask.decoding.generate import generate_many
from unmask.decoding.options import DecodeOptions
from unmask.diffusion.objective import antithetic_t, denoiser_logits, mask_tokens
from unmask.eval.quality import function_prompts
from unmask.io import atomic_path
from unmask.model.checkpoints import load_model, save_model
from unmask.model.transformer import Transformer
from unmask.tokenizer import Tokenizer
from unmask.train.config import TrainConfig, TrainConfigError
from unmask.train.trainer import Trainer

log = logging.getLogger(__name__)

METHODS = ("sdtt", "trajectory")
PROMPT_SOURCES = ("cut", "functions")
DIVERGENCES = ("kl", "reverse_kl")


@dataclass
class DistillConfig:
    method: str = "sdtt"
    rounds: int = 3  # sdtt: each round halves the steps
    steps_per_round: int = 500  # optimizer steps per round (sdtt); trajectory trains cfg.steps in one round
    teacher_steps: int = 64  # sdtt: steps the first teacher takes to denoise a fully masked window
    divergence: str = "reverse_kl"  # sdtt: kl(teacher||student) or reverse kl(student||teacher)
    # trajectory
    prompts: int = 256  # prompts the teacher answers
    prompt_source: str = "cut"  # cut: random corpus windows; functions: signature + docstring of corpus functions
    prompt_tokens: int = 64  # cut: the prompt length; functions: the longest prompt
    answer_tokens: int = 64  # row = prompt_tokens + answer_tokens
    teacher_threshold: float = 0.9
    # sampled answers (temperature > 0) or a frequency penalty keep a small teacher's greedy loops
    # out of the student's data
    teacher_temperature: float = 0.0
    teacher_top_p: float | None = None
    teacher_frequency_penalty: float = 0.0
    answer_model: str | None = None  # who answers the prompts (same tokenizer); None: the teacher itself
    answer_batch: int = 32  # prompts answered together (one engine queue, or one batch of AR rows)
    entropy_weight: float = 0.5

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainConfigError(f"distillation method must be one of {METHODS}, got {self.method!r}")
        if self.divergence not in DIVERGENCES:
            raise TrainConfigError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if self.method == "sdtt" and self.teacher_steps >> self.rounds < 1:
            raise TrainConfigError(f"{self.rounds} rounds halve {self.teacher_steps} teacher steps below 1")
        if self.prompt_source not in PROMPT_SOURCES:
            raise TrainConfigError(f"prompt source must be one of {PROMPT_SOURCES}, got {self.prompt_source!r}")
        for name in ("teacher_temperature", "entropy_weight"):  # a negative entropy weight rewards doubt
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("rounds", "steps_per_round", "teacher_steps", "prompts", "prompt_tokens", "answer_tokens",
                     "answer_batch"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


# --- sdtt ------------------------------------------------------------------------------------------
@torch.no_grad()
def two_step_targets(teacher: Transformer, x0: torch.Tensor, x_t: torch.Tensor, masked: torch.Tensor,
                     t: torch.Tensor, dt: float, generator: torch.Generator | None) -> torch.Tensor:
    """Teacher's distribution after two ancestral steps t -> t-dt -> t-2dt, per position [B, L, V].

    Step 1 reveals each masked token with probability dt/t, sampled from the teacher; a revealed token's
    target is the distribution it was drawn from, the others' is the teacher's prediction after step 1
    (a one-sample estimate of the two-step marginal)."""
    p1 = denoiser_logits(teacher, x_t, x0).float().softmax(-1)
    reveal_p = (dt / t).clamp(max=1.0)[:, None]
    reveal = masked & (torch.rand(masked.shape, generator=generator).to(x0.device) < reveal_p)
    draws = torch.multinomial(p1.flatten(0, 1), 1, generator=_device_gen(generator, p1)).view(masked.shape)
    x_mid = torch.where(reveal, draws, x_t)
    p2 = denoiser_logits(teacher, x_mid, x0).float().softmax(-1)
    return torch.where(reveal[..., None], p1, p2)


def _device_gen(generator, tensor):
    # torch.multinomial needs a generator on the tensor's device; on CPU reuse the caller's stream
    return generator if tensor.device.type == "cpu" else None


def divergence(student_logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence [B, L] between the target distribution and the student."""
    log_q = student_logits.float().log_softmax(-1)
    log_p = target.clamp_min(1e-12).log()
    if kind == "kl":  # KL(teacher || student): mass-covering
        return (target * (log_p - log_q)).sum(-1)
    q = log_q.exp()  # KL(student || teacher): mode-seeking, sharper few-step samples
    return (q * (log_q - log_p)).sum(-1)


def sdtt_loss(student: torch.nn.Module, teacher: Transformer, x0: torch.Tensor, dt: float, kind: str = "reverse_kl",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean divergence over masked positions between the student's one step and the teacher's two."""
    mask_id = teacher.config.mask_id
    t = antithetic_t(x0.shape[0], generator=generator, device=x0.device)
    x_t, masked = mask_tokens(x0, t, mask_id, generator)
    target = two_step_targets(teacher, x0, x_t, masked, t, dt, generator)
    div = divergence(denoiser_logits(student, x_t, x0), target, kind)
    return (div * masked).sum() / masked.sum().clamp(min=1)


# --- trajectory ------------------------------------------------------------------------------------
def certainty_forcing_loss(model: torch.nn.Module, x0: torch.Tensor, prompt_len: torch.Tensor,
                           entropy_weight: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy on masked answer tokens + entropy penalty where the prediction is already right."""
    B, L = x0.shape
    answer = torch.arange(L, device=x0.device)[None, :] >= prompt_len[:, None]
    t = antithetic_t(B, generator=generator, device=x0.device)
    x_t, masked = mask_tokens(x0, t, model.config.mask_id, generator, answer)
    logits = denoiser_logits(model, x_t, x0).float()
    logp = logits.log_softmax(-1)
    ce = -logp.gather(-1, x0[..., None]).squeeze(-1)
    right = masked & (logits.argmax(-1) == x0)
    entropy = -(logp.exp() * logp).sum(-1)
    n = masked.sum().clamp(min=1)
    return (ce * masked).sum() / n + entropy_weight * (entropy * right).sum() / n


def trajectory_prompts(pipe, texts, dcfg: DistillConfig, rng: np.random.Generator) -> list[list[int]]:
    """Token ids of the prompts the teacher answers: `dcfg.prompts` of them, at most prompt_tokens long."""
    if dcfg.prompt_source == "functions":
        found = (pipe.encode(p.prompt) for p in function_prompts(texts, limit=10**9, seed=int(rng.integers(2**31))))
        return [ids for ids in found if len(ids) <= dcfg.prompt_tokens][: dcfg.prompts]
    prompts = []
    for text in texts:
        ids = pipe.encode(text)
        if len(ids) > dcfg.prompt_tokens:
            start = int(rng.integers(0, len(ids) - dcfg.prompt_tokens))
            prompts.append(ids[start : start + dcfg.prompt_tokens])
            if len(prompts) == dcfg.prompts:
                break
    return prompts


def collect_trajectories(teacher_dir: str | Path, texts, dcfg: DistillConfig, out_file: Path, seed: int = 0,
                         progress: bool = True) -> int:
    """Let the teacher (or `dcfg.answer_model`) answer `dcfg.prompts` prompts from `texts`; write
    {prompt, answer} jsonl. Each answer fills its row up to prompt_tokens + answer_tokens tokens (an AR
    answerer may stop earlier, at its EOS)."""
    from rich.progress import Progress

    pipe = unmask.load(dcfg.answer_model or teacher_dir)
    if dcfg.answer_model:
        check_same_tokenizer(teacher_dir, dcfg.answer_model, pipe.tokenizer)
    rng = np.random.default_rng(seed)
    opts = DecodeOptions(block_length=min(32, dcfg.answer_tokens), policy="threshold",
                         threshold=dcfg.teacher_threshold, early_stop=False, temperature=dcfg.teacher_temperature,
                         top_p=dcfg.teacher_top_p, frequency_penalty=dcfg.teacher_frequency_penalty)
    prompts = trajectory_prompts(pipe, texts, dcfg, rng)
    if not prompts:
        found = ("no function with a docstring whose prompt fits in" if dcfg.prompt_source == "functions"
                 else "no document longer than")
        raise TrainConfigError(f"{found} {dcfg.prompt_tokens} tokens in the data")
    row = dcfg.prompt_tokens + dcfg.answer_tokens
    options = [opts.replace(max_new_tokens=row - len(ids), seed=int(rng.integers(2**31))) for ids in prompts]
    prompt_texts = [pipe.tokenizer.decode(ids) for ids in prompts]  # text prompts: token-healed as in generate()
    answers: list[str | None] = [None] * len(prompts)
    with Progress(console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("teacher trajectories", total=len(prompts))
        for i, result in generate_many(pipe, prompt_texts, options, max_batch=dcfg.answer_batch):
            answers[i] = result.text
            bar.advance(task)
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for prompt, answer in zip(prompt_texts, answers):
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
    return len(prompts)


def check_same_tokenizer(teacher_dir: str | Path, answer_dir: str | Path, answer_tokenizer) -> None:
    """The student re-reads the answers as token ids: a different vocabulary would teach it other tokens."""
    teacher_vocab = Tokenizer.from_dir(teacher_dir).hf.get_vocab()
    if answer_tokenizer.hf.get_vocab() != teacher_vocab:
        raise TrainConfigError(f"the answer model {answer_dir} has another tokenizer than the teacher {teacher_dir}; "
                               "sequence-level distillation needs the same vocabulary")


# --- the distiller ---------------------------------------------------------------------------------
class Distiller(Trainer):
    """A Trainer whose loss comes from a frozen teacher (sdtt) or from teacher trajectories (trajectory)."""

    def __init__(self, cfg: TrainConfig, dcfg: DistillConfig, resume=False, progress: bool = True):
        dcfg.validate()
        if cfg.init_from is None:
            raise TrainConfigError("distillation needs the teacher folder as init_from")
        self.dcfg = dcfg
        self.teacher_dir = Path(cfg.init_from)
        self._teacher: Transformer | None = None
        self._teacher_round = -1
        super().__init__(cfg, resume=resume, progress=progress)

    @property
    def round(self) -> int:
        return min(self.step // self.dcfg.steps_per_round, self.dcfg.rounds - 1)

    def round_dir(self, r: int) -> Path:
        return self.out / "rounds" / f"round_{r}"

    def teacher_steps(self, r: int) -> int:
        return self.dcfg.teacher_steps >> r

    def teacher(self) -> Transformer:
        r = self.round
        if self._teacher_round != r:
            src = self.teacher_dir if r == 0 else self.round_dir(r - 1)
            self._teacher = load_model(src, device=self.device, dtype=torch.float32).eval().requires_grad_(False)
            self._teacher_round = r
            log.info("round %d: teacher %s at %d steps, student learns %d", r, src, self.teacher_steps(r),
                     self.teacher_steps(r) // 2)
        return self._teacher

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dcfg.method == "trajectory":
            return certainty_forcing_loss(self.train_model, batch["input_ids"], batch["prompt_len"],
                                          self.dcfg.entropy_weight, self.generator)
        dt = 1.0 / self.teacher_steps(self.round)
        return sdtt_loss(self.train_model, self.teacher(), batch["input_ids"], dt, self.dcfg.divergence, self.generator)

    def train_step(self) -> float:
        value = super().train_step()
        if self.dcfg.method == "sdtt" and self.step % self.dcfg.steps_per_round == 0 and self.dist.is_main:
            # the student at the end of a round is the next round's teacher
            r = self.step // self.dcfg.steps_per_round - 1
            save_model(self.model, self.round_dir(r))
            self.tokenizer.save(self.round_dir(r))
        return value

    @torch.no_grad()
    def few_step_loss(self, batches: int = 4, seed: int = 1234) -> float:
        """The current round's objective on fixed noise: what a round should lower."""
        gen = torch.Generator().manual_seed(seed)
        data = self.train_data
        idx = np.arange(min(data.n, batches * self.micro))
        batch = data.get(np.zeros_like(idx), idx)
        self.model.eval()
        if self.dcfg.method == "trajectory":
            value = certainty_forcing_loss(self.model, batch["input_ids"].to(self.device),
                                           batch["prompt_len"].to(self.device), self.dcfg.entropy_weight, gen)
        else:
            dt = 1.0 / self.teacher_steps(self.round)
            value = sdtt_loss(self.model, self.teacher(), batch["input_ids"].to(self.device), dt,
                              self.dcfg.divergence, gen)
        self.model.train()
        return float(value)


def distill_config(teacher: str | Path, out: str | Path, data: str | None, dcfg: DistillConfig,
                   base: TrainConfig | None = None) -> TrainConfig:
    """The TrainConfig a distillation run trains with: student initialised from the teacher."""
    cfg = base or TrainConfig()
    if cfg.minutes is not None and dcfg.method == "sdtt":
        raise TrainConfigError("minutes: sdtt rounds are counted in optimizer steps (--steps-per-round)")
    steps = dcfg.rounds * dcfg.steps_per_round if dcfg.method == "sdtt" else cfg.steps
    changes = dict(out_dir=str(out), init_from=str(teacher), steps=steps,
                   mode="sft" if dcfg.method == "trajectory" else "diffusion")
    if dcfg.method == "trajectory":  # rows are exactly prompt + answer (collect_trajectories)
        changes["seq_len"] = dcfg.prompt_tokens + dcfg.answer_tokens
    if data is not None:
        changes["data"] = dataclasses.replace(cfg.data, train=str(data), corpus=None if dcfg.method == "trajectory" else cfg.data.corpus)
    return dataclasses.replace(cfg, **changes)
