"""The training loop: batches -> forward -> loss -> backward -> step -> log -> validate -> checkpoint.

    trainer = Trainer(load_config("recipes/tiny.yaml"), resume=True)
    trainer.fit()

Modes: `diffusion` (masked-diffusion loss), `ar` (the causal twin), `sft` (prompt kept, answer masked).
Runs in one process or under torchrun (DDP, or FSDP2 with `fsdp: true`). A checkpoint folder is a loadable
model folder plus `trainer.pt` (optimizer, scheduler, step, data position) and one `rng_rank{r}.pt` per
process, so `--resume` takes exactly the step the interrupted run would have taken next.

out_dir/
  config.json, model*.safetensors, tokenizer.json   the final model (`unmask.load(out_dir)`)
  checkpoints/step_NNNNNNNN/, checkpoints/latest     resumable checkpoints
  data/{train,val}.bin + .json                        token shards made from the corpus
  train_config.yaml, log.jsonl                        the resolved config; metrics per log/eval step
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from rich.console import Console

from unmask.data.batches import IndexSampler, SFTData, WindowData
from unmask.data.corpus import iter_corpus_texts
from unmask.data.shards import TokenShard, sidecar, token_byte_lengths, tokenizer_digest, write_shard
from unmask.decoding.layout import layout_for
from unmask.diffusion.objective import adaptation_loss, ar_loss, masked_diffusion_loss, sft_loss
from unmask.errors import UnmaskError
from unmask.eval.elbo import ElboResult, eval_window_len, score_windows, window_starts
from unmask.io import atomic_write_text
from unmask.model.adapter import is_adapter_param
from unmask.model.base import BaseRef, base_of, named_base, read_base, save_adaptation
from unmask.model.checkpoints import load_model, read_config, save_model
from unmask.model.gguf import cached_folder, is_gguf
from unmask.model.config import SHAPES, ConfigError, ModelConfig
from unmask.model.transformer import Transformer
from unmask.pipeline import parse_dtype
from unmask.tokenizer import Tokenizer
from unmask.train import distributed as dist_utils
from unmask.train.checkpoint_io import save_torch, write_failure
from unmask.train.config import TrainConfig, TrainConfigError, save_config
from unmask.train.schedule import StepBudget, lr_multiplier

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"


class TrainError(UnmaskError, RuntimeError):
    pass


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], mode: str, generator: torch.Generator) -> torch.Tensor:
    x = batch["input_ids"]
    if mode == "ar":
        return ar_loss(model, x)
    if mode == "sft":
        return sft_loss(model, x, batch["prompt_len"], generator=generator)
    if mode == "adapt":
        return adaptation_loss(model, x, generator=generator)
    return masked_diffusion_loss(model, x, generator=generator)


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms, biases and embeddings (1-D tensors and the token table)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def build_model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """Shape preset + `model:` keys + the tokenizer's vocabulary size and special ids."""
    section = dict(cfg.model)
    shape = section.pop("shape", None)
    if shape is not None and shape not in SHAPES:
        raise TrainConfigError(f"model.shape {shape!r} is unknown; known: {', '.join(SHAPES)}")
    base = dict(SHAPES.get(shape, {}))
    base.update(section)
    base.setdefault("vocab_size", tokenizer.vocab_size)
    if shape is not None and "vocab_size" not in section:
        base["vocab_size"] = tokenizer.vocab_size
    if base["vocab_size"] < tokenizer.vocab_size:
        raise TrainConfigError(f"model.vocab_size {base['vocab_size']} is smaller than the tokenizer's "
                               f"{tokenizer.vocab_size}")
    base.update(mask_id=tokenizer.mask_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id)
    base.setdefault("max_seq_len", cfg.seq_len)
    try:
        return ModelConfig(**base)
    except (ConfigError, TypeError) as e:
        raise TrainConfigError(f"model section: {e}") from None


UNPLANNED = 2**62  # cfg.steps while a `minutes` budget is still timing its first steps


def cfg_steps_if_planned(cfg: TrainConfig, budget: StepBudget | None) -> int | None:
    """The step count a `minutes` run settled on (kept on resume), None before that or without a budget."""
    return cfg.steps if cfg.minutes is not None and budget is None else None


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool | str | Path = False, progress: bool = True):
        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self.dist = dist_utils.init_distributed(cfg.device)
        self.device = self.dist.device
        self.out = Path(cfg.out_dir)
        self.mode = cfg.mode

        self.base = self._resolve_base()
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model()
        self._check_lengths()
        self.train_data, self.val_data = self._load_data()
        self.sampler = IndexSampler(self.train_data.n, cfg.seed)
        self.per_rank, self.micro, self.accum = self._batch_layout()
        # masking noise: one stream per process, saved with each checkpoint
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + self.dist.rank)

        self.train_model = self._wrap(self.model)
        self.optimizer = make_optimizer(self.model, cfg, fused=self.device.type == "cuda" and not cfg.fsdp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_multiplier(s, cfg.steps, cfg.optim))
        self.step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0  # step time so far (validation and checkpoints excluded)
        self.budget: StepBudget | None = None
        if cfg.minutes is not None:  # steps are planned after the first timed steps (fit)
            self.budget = StepBudget(cfg.minutes, cfg.optim.warmup_steps)
            cfg.steps = UNPLANNED
        if resume is True:
            self.resume_latest()
        elif resume:
            self.load_checkpoint(resume)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "train_config.yaml")
            if self.step:  # resumed: drop the rows an interrupted run logged after its last checkpoint
                atomic_write_text(self.out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    # --- setup -------------------------------------------------------------------------------------
    def _load_tokenizer(self) -> Tokenizer:
        d = self.cfg.data
        for source in (d.corpus, d.train):
            if source and not Path(source).exists():
                raise TrainConfigError(f"training data not found: {source} (build a corpus with `unmask corpus`)")
        if self.init_dir is not None and not self.init_dir.is_dir():
            raise TrainConfigError(f"model folder not found: {self.cfg.init_from} (init_from)")
        folder = d.tokenizer
        if folder is None and self.init_dir is not None:
            folder = str(self.init_dir)
        if folder is None and d.corpus:
            folder = str(Path(d.corpus) / "tokenizer")
        if folder is None:
            raise TrainConfigError("no tokenizer: set data.tokenizer (train one with `unmask tokenizer`)")
        if not (Path(folder) / "tokenizer.json").exists():
            raise TrainConfigError(f"no tokenizer.json in {folder} (train one with `unmask tokenizer CORPUS`)")
        return Tokenizer.from_dir(folder)

    def _resolve_base(self) -> BaseRef | None:
        """init_from as a named base ("smollm2") or a .gguf file: its converted folder becomes init_dir and,
        when the model has an adapter, the base its saved folders refer to instead of holding every weight."""
        init = self.cfg.init_from
        self.init_dir = Path(init) if init else None
        if self.init_dir is not None and self.init_dir.is_dir():
            return read_base(self.init_dir)  # an adaptation folder (or None for a folder with all its weights)
        file = named_base(init) if init else None
        if file is None and init and is_gguf(init):
            file = Path(init)
        if file is None:
            return None
        self.init_dir = cached_folder(file)
        return base_of(file)

    @property
    def adapter_only(self) -> bool:
        """Only the adapter trains (the base stays frozen); saved folders refer to the base for the rest."""
        return self.model.config.adapter_rank > 0

    def _build_model(self) -> Transformer:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical init on every rank
        if cfg.init_from:
            base_cfg, _, _ = read_config(self.init_dir)
            section = {k: v for k, v in cfg.model.items() if k != "shape"}
            try:
                config = dataclasses.replace(base_cfg, **section)
            except (ConfigError, TypeError) as e:
                raise TrainConfigError(f"model section: {e}") from None
            source = load_model(self.init_dir, device="cpu", dtype=torch.float32)
            model = Transformer(config)
            try:
                missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
                fresh_mask_embedding = "mask_embedding" in missing
                if unexpected or not all(is_adapter_param(n) for n in missing):
                    model.load_state_dict(source.state_dict())  # raises, naming the mismatch
            except RuntimeError as e:
                raise TrainConfigError(f"init_from {cfg.init_from}: the model section changes weight shapes "
                                       f"({str(e).splitlines()[-1].strip()})") from None
            log.info("initialised from %s (attention %s, logits_shift %s)", cfg.init_from, config.attention,
                     config.logits_shift)
        else:
            model = Transformer(build_model_config(cfg, self.tokenizer)).init_weights(cfg.seed)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise TrainConfigError(f"tokenizer has {self.tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
        if model.config.adapter_rank:
            if not cfg.init_from or fresh_mask_embedding:
                with torch.no_grad():  # [MASK] starts as its token's own embedding
                    model.mask_embedding.copy_(model.tok_embeddings.weight[model.config.mask_id])
            for name, p in model.named_parameters():
                p.requires_grad_(is_adapter_param(name))
        return model.to(self.device).train()

    def _check_lengths(self) -> None:
        c, L, layout = self.model.config, self.cfg.seq_len, layout_for(self.model.config)
        if self.mode == "ar" and layout.diffusion:
            raise TrainConfigError(f"mode ar needs model.attention causal, got {layout.name}")
        if self.mode != "ar" and not layout.diffusion:
            raise TrainConfigError(f"mode {self.mode} needs a bidirectional or block_causal model, got causal")
        if self.mode == "adapt" and not layout.block_causal:
            raise TrainConfigError(f"mode adapt needs model.attention block_causal, got {layout.name}")
        need = 2 * L if layout.block_causal and self.mode != "ar" else L
        if need > c.max_seq_len:
            why = " (block diffusion feeds [x_t, x_0], 2 × seq_len tokens)" if need > L else ""
            raise TrainConfigError(f"seq_len {L} needs model.max_seq_len >= {need}{why}, got {c.max_seq_len}")

    def _shard_for(self, source: str, split: str) -> TokenShard:
        """A token shard for `source` (a .bin shard, a corpus folder, .jsonl or .txt), tokenized once into
        out_dir/data/ by rank 0 and reused while the source and tokenizer are unchanged."""
        src = Path(source)
        if src.suffix == ".bin":
            return TokenShard.open(src)
        if not src.exists():
            raise TrainConfigError(f"training data not found: {src}")
        file = src / ("train.jsonl" if split == "train" else "val.jsonl") if src.is_dir() else src
        if not file.exists():
            raise TrainConfigError(f"{src} is not a corpus folder (no {file.name})")
        stat = file.stat()
        stamp = {"source": str(file.resolve()), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                 "tokenizer_sha256": tokenizer_digest(self.tokenizer)}
        path = self.out / "data" / f"{split}.bin"
        if self.dist.is_main:
            fresh = False
            if path.exists() and sidecar(path).exists():
                meta = json.loads(sidecar(path).read_text())
                fresh = all(meta.get(k) == v for k, v in stamp.items())
            if not fresh:
                log.info("tokenizing %s -> %s", file, path)
                write_shard(iter_corpus_texts(file, text_field=self.cfg.data.text_field), self.tokenizer, path,
                            extra=stamp)
        dist_utils.barrier()
        return TokenShard.open(path)

    def _load_data(self):
        d, L = self.cfg.data, self.cfg.seq_len
        train_src = d.train or d.corpus
        val_src = d.val or (d.corpus if d.corpus and (Path(d.corpus) / "val.jsonl").exists() else None)
        if self.mode == "sft":
            train = SFTData(train_src, self.tokenizer, L)
            val = SFTData(val_src, self.tokenizer, L) if d.val else None
            return train, val
        extra = 1 if self.mode == "ar" else 0
        shard = self._shard_for(train_src, "train")
        shard.check_vocab(self.model.config.vocab_size)
        train = WindowData(shard, L, extra=extra, seed=self.cfg.seed)
        val = None
        if val_src is not None:
            val = self._shard_for(val_src, "val")
            if val.n_tokens < 2:
                val = None
        return train, val

    def _batch_layout(self) -> tuple[int, int, int]:
        cfg, world = self.cfg, self.dist.world_size
        if cfg.batch_size % world:
            raise TrainConfigError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
        per_rank = cfg.batch_size // world
        micro = min(cfg.micro_batch_size or per_rank, per_rank)
        if per_rank % micro:
            raise TrainConfigError(f"batch_size per process {per_rank} is not divisible by micro_batch_size {micro}")
        return per_rank, micro, per_rank // micro

    def _wrap(self, model: Transformer) -> nn.Module:
        cfg = self.cfg
        wrapped: nn.Module = model
        if self.dist.enabled and cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            wrapped.config = model.config  # the objectives read model.config
        if cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype in ("bfloat16", "bf16", "float16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.dtype.startswith("b") else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if self.device.type == "cpu" and self.cfg.cpu_autocast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- one step ----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on one micro-batch (subclasses such as the distiller replace it)."""
        return compute_loss(self.train_model, batch, self.mode, self.generator)

    def train_step(self) -> float:
        """One optimizer step over one global batch; returns its mean loss over all processes."""
        epochs, indices = self.sampler.take(self.cfg.batch_size)
        rows = slice(self.dist.rank * self.per_rank, (self.dist.rank + 1) * self.per_rank)
        batch = self.train_data.get(epochs[rows], indices[rows])
        total = torch.zeros((), device=self.device)
        ddp = hasattr(self.train_model, "no_sync") or hasattr(getattr(self.train_model, "_orig_mod", None), "no_sync")
        for k in range(self.accum):
            micro = {key: v[k * self.micro : (k + 1) * self.micro].to(self.device, non_blocking=True)
                     for key, v in batch.items()}
            last = k == self.accum - 1
            sync = contextlib.nullcontext()
            if ddp and not last:
                sync = getattr(self.train_model, "_orig_mod", self.train_model).no_sync()
            with sync:
                with self.autocast():
                    loss = self.loss(micro) / self.accum
                loss.backward()
            total += loss.detach()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        value = float(dist_utils.all_reduce_sum(total) / self.dist.world_size)
        if not math.isfinite(value):
            raise TrainError(f"loss became {value} at step {self.step} (lower optim.lr or raise warmup_steps)")
        return value

    # --- validation --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation in bits per byte (diffusion ELBO / AR NLL), or the SFT loss per answer token."""
        if self.val_data is None:
            return {}
        gen = torch.Generator().manual_seed(self.cfg.seed + 17 + self.dist.rank)  # same noise at every eval
        if self.mode == "sft":
            data: SFTData = self.val_data
            n = min(data.n, self.cfg.eval_sequences)
            self.model.eval()
            total = torch.zeros(2, device=self.device, dtype=torch.float64)
            for i in range(self.dist.rank * self.micro, n, self.micro * self.dist.world_size):
                idx = np.arange(i, min(i + self.micro, n))
                b = {k: v.to(self.device) for k, v in data.get(idx, idx).items()}
                with self.autocast():
                    loss = sft_loss(self.model, b["input_ids"], b["prompt_len"], generator=gen)
                total += torch.tensor([float(loss) * len(idx), len(idx)], device=self.device, dtype=torch.float64)
            self.model.train()
            total = dist_utils.all_reduce_sum(total)
            return {"val_loss": float(total[0] / total[1].clamp(min=1))}
        if self.mode == "adapt":
            return self._evaluate_adaptation(gen)
        shard: TokenShard = self.val_data
        L = eval_window_len(self.model, self.cfg.seq_len)
        starts = window_starts(shard.n_tokens, L, self.cfg.eval_sequences)
        if self.dist.enabled:
            # equal shares of full windows: FSDP needs the same forwards on every process
            starts = [s for s in starts if s + L <= shard.n_tokens]
            starts = starts[: len(starts) - len(starts) % self.dist.world_size]
        mine = starts[self.dist.rank :: self.dist.world_size]
        if self._byte_len is None:
            self._byte_len = token_byte_lengths(self.tokenizer, self.model.config.vocab_size)
        result = score_windows(self.model, shard.tokens, mine, L, self._byte_len, n_samples=self.cfg.eval_samples,
                               batch_size=self.micro, generator=gen, autocast=self.autocast(), device=self.device)
        t = torch.tensor([result.nats, result.tokens, result.bytes], device=self.device, dtype=torch.float64)
        t = dist_utils.all_reduce_sum(t)
        r = ElboResult(float(t[0]), int(t[1]), int(t[2]), exact=result.exact)
        return {"val_bpb": r.bits_per_byte, "val_nats_per_token": r.nats_per_token}

    _byte_len: np.ndarray | None = None

    def _evaluate_adaptation(self, gen: torch.Generator) -> dict[str, float]:
        """The adaptation loss on validation windows, with the same masks at every evaluation."""
        shard: TokenShard = self.val_data
        L = self.cfg.seq_len
        starts = window_starts(shard.n_tokens, L, self.cfg.eval_sequences)[self.dist.rank :: self.dist.world_size]
        starts = [s for s in starts if s + L <= shard.n_tokens]
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for i in range(0, len(starts), self.micro):
            x = torch.stack([torch.from_numpy(shard.tokens[s : s + L].astype(np.int64)) for s in starts[i : i + self.micro]])
            with self.autocast():
                loss = adaptation_loss(self.model, x.to(self.device), generator=gen)
            total += torch.tensor([float(loss) * len(x), len(x)], device=self.device, dtype=torch.float64)
        self.model.train()
        total = dist_utils.all_reduce_sum(total)
        return {"val_loss": float(total[0] / total[1].clamp(min=1))}

    # --- checkpoints -------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        marker = self.out / CHECKPOINTS / LATEST
        if not marker.exists():
            return None
        path = self.out / CHECKPOINTS / marker.read_text().strip()
        return path if path.exists() else None

    def _full_state(self) -> tuple[dict, dict]:
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=opts),
                    get_optimizer_state_dict(self.model, self.optimizer, options=opts))
        return self.model.state_dict(), self.optimizer.state_dict()

    def _export(self, path: Path, state: dict, dtype: torch.dtype | None = None) -> None:
        """Write a loadable model folder (config.json, safetensors, tokenizer) from a full state dict."""
        if self.cfg.fsdp and self.dist.enabled:
            with torch.device("meta"):
                model = Transformer(self.model.config)
            model.load_state_dict(state, assign=True)
        else:
            model = self.model
        if self.adapter_only and self.base is not None:
            save_adaptation(model, path, self.base, dtype=dtype)
        else:
            save_model(model, path, max_shard_bytes=self.cfg.max_shard_mb << 20, dtype=dtype)
        self.tokenizer.save(path)

    def rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path:
        """checkpoints/step_N written in a temp folder and renamed, then `latest` updated: a kill at any
        moment leaves the previous checkpoint intact."""
        root = self.out / CHECKPOINTS
        name = f"step_{self.step:08d}"
        tmp = root / f".tmp-{name}"
        model_state, optim_state = self._full_state()  # collective under FSDP
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist_utils.barrier()
        try:
            save_torch(self.rng_state(), tmp / f"rng_rank{self.dist.rank}.pt")
            if self.dist.is_main:
                self._export(tmp, model_state)
                save_torch({"step": self.step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                            "sampler": self.sampler.state_dict(), "world_size": self.dist.world_size,
                            "train_seconds": self.train_seconds,
                            "planned_steps": cfg_steps_if_planned(self.cfg, self.budget),
                            "config": self.cfg.to_dict(), "history": self.history}, tmp / TRAINER_STATE)
        except BaseException as e:  # disk full, interrupted: no half-written folder left to fill the disk
            latest = self.latest_checkpoint()
            failure = write_failure(e, tmp, latest.name if latest else None)  # while the disk is still full
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from None
            raise
        dist_utils.barrier()
        final = root / name
        if self.dist.is_main:
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            atomic_write_text(root / LATEST, name + "\n")
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[: max(0, len(done) - max(1, self.cfg.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return final

    def resume_latest(self) -> None:
        """Resume from `latest`; if it cannot be read (a corrupt or truncated file), from the newest intact
        checkpoint before it, saying so."""
        latest = self.latest_checkpoint()
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.out / CHECKPOINTS)
            return
        older = sorted((p for p in latest.parent.glob("step_*") if p.is_dir() and p.name < latest.name), reverse=True)
        problem = None
        for path in [latest, *older]:
            try:
                state, weights = self._read_checkpoint(path)
            except TrainError as e:
                problem = problem or e
                continue
            if path != latest:
                log.warning("the latest checkpoint is unreadable (%s): resuming from %s, the newest intact one",
                            problem, path.name)
            self._apply_checkpoint(path, state, weights)
            return
        raise problem

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict]:
        """(trainer state, model weights) of a checkpoint folder; TrainError if they cannot be read."""
        state_file = path / TRAINER_STATE
        if not state_file.exists():
            raise TrainError(f"not a training checkpoint (no {TRAINER_STATE}): {path}")
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated / corrupt pickle
            raise TrainError(f"corrupt checkpoint {state_file}: {e}") from None
        try:
            weights = load_model(path, device="cpu", dtype=torch.float32).state_dict()
        except Exception as e:  # truncated weights, a missing shard
            first_line = (str(e) or type(e).__name__).splitlines()[0]
            raise TrainError(f"corrupt checkpoint {path}: {first_line}") from None
        return state, weights

    def load_checkpoint(self, path: str | Path) -> None:
        path = Path(path)
        self._apply_checkpoint(path, *self._read_checkpoint(path))

    def _apply_checkpoint(self, path: Path, state: dict, weights: dict) -> None:
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            try:
                self.model.load_state_dict(weights)
            except RuntimeError as e:
                raise TrainError(f"checkpoint {path} does not match the configured model: "
                                 f"{str(e).splitlines()[-1].strip()}") from None
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        if self.cfg.minutes is not None and state.get("planned_steps"):
            self.cfg.steps, self.budget = int(state["planned_steps"]), None  # keep the plan of the first run
        rng_file = path / f"rng_rank{self.dist.rank}.pt"
        if state.get("world_size") == self.dist.world_size and rng_file.exists():
            rng = torch.load(rng_file, map_location="cpu", weights_only=False)
            torch.set_rng_state(rng["torch"])
            self.generator.set_state(rng["generator"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            log.warning("resuming on %d processes from a %s-process checkpoint: masking noise restarts",
                        self.dist.world_size, state.get("world_size"))
        log.info("resumed from %s at step %d", path, self.step)

    # --- the loop ----------------------------------------------------------------------------------
    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.is_main:
            with open(self.out / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def fit(self) -> dict:
        """Train to cfg.steps; returns the last metrics. Writes the final model folder into out_dir."""
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                       TextColumn("{task.fields[val]}"), TimeRemainingColumn(),
                       console=Console(stderr=True), disable=not (self.progress and self.dist.is_main), transient=False)
        metrics: dict = {}
        window_loss, window_steps, t0 = 0.0, 0, time.perf_counter()
        tps = 0.0
        with bar:
            task = bar.add_task("train", total=None if cfg.steps == UNPLANNED else cfg.steps, completed=self.step,
                                loss="-", tps="-", val="")
            while self.step < cfg.steps:
                t_step = time.perf_counter()
                loss = self.train_step()
                took = time.perf_counter() - t_step
                self.train_seconds += took
                if self.budget is not None:
                    self._plan_steps(took)
                    bar.update(task, total=None if cfg.steps == UNPLANNED else cfg.steps)
                window_loss += loss
                window_steps += 1
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    tps = window_steps * tokens_per_step / max(dt, 1e-9)
                    row = {"step": self.step, "loss": window_loss / window_steps, "lr": self.scheduler.get_last_lr()[0],
                           "tokens_per_s": tps}
                    self._log(row)
                    metrics.update(row)
                    window_loss, window_steps, t0 = 0.0, 0, time.perf_counter()
                bar.update(task, completed=self.step, loss=f"{loss:.3f}", tps=f"{tps:,.0f}")
                do_eval = (cfg.eval_interval and self.step % cfg.eval_interval == 0) or self.step == cfg.steps
                if do_eval and self.val_data is not None:
                    ev = self.evaluate()
                    self._log({"step": self.step, **ev})
                    metrics.update(ev)
                    shown = ev.get("val_bpb", ev.get("val_loss"))
                    bar.update(task, val=f"val {shown:.3f}{' bpb' if 'val_bpb' in ev else ''}")
                    log.info("step %d %s", self.step, " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
                    t0 = time.perf_counter()  # keep validation out of tokens/s
                if (cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0) or self.step == cfg.steps:
                    self.save_checkpoint()
                    t0 = time.perf_counter()
        self.save_final()
        return metrics

    def _plan_steps(self, step_seconds: float) -> None:
        """`minutes` budget: once the timing window is over, fix cfg.steps (the lr schedule reads it)."""
        planned = self.budget.plan(self.step, step_seconds, self.train_seconds)
        if planned is None:
            return
        self.cfg.steps = dist_utils.broadcast_int(planned, self.device)  # every rank stops together
        pace, self.budget = self.budget.pace, None
        self._log({"step": self.step, "planned_steps": self.cfg.steps, "seconds_per_step": pace})
        log.info("%.1f minutes at %.3f s/step: training %d steps", self.cfg.minutes, pace, self.cfg.steps)
        if self.dist.is_main:
            save_config(self.cfg, self.out / "train_config.yaml")

    def save_final(self) -> Path:
        model_state = None
        if self.cfg.fsdp and self.dist.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            model_state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.dist.is_main:
            self._export(self.out, model_state, dtype=parse_dtype(self.cfg.save_dtype))
        dist_utils.barrier()
        return self.out
