"""lm-evaluation-harness adapter: run harness tasks on any unmask model.

    unmask eval lm-eval --model unmask --model_args pretrained=PATH,mc_samples=64 --tasks hellaswag ...
    (lm_eval's own CLI with the model registered; in Python `import unmask.eval.lm_eval`, then
    lm_eval.simple_evaluate(model="unmask", ...) or model=UnmaskLM(pipeline=pipe))

loglikelihood(context, continuation)  masked diffusion has no exact likelihood: the continuation's log-probability
    is bounded by LLaDA's Monte-Carlo ELBO with only the continuation masked (l ~ U{1..L} of its L tokens masked,
    weight L/l), averaged over `mc_samples` masks (stratified l). Block-diffusion models use the block form (clean
    earlier blocks); causal twins are scored exactly. `is_greedy` decodes the fully masked continuation greedily,
    one most-confident token per step, and compares.
loglikelihood_rolling(text)  the same bound over windows of the model context.
generate_until(context, gen_kwargs)  the decoding engine (Pipeline.generate), cut at `until`.

lm-eval is optional (`pip install unmask[eval]`; it is heavy): without it the class is a plain object with the
same methods, usable with any request objects that carry `.args`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

import unmask
from unmask.decoding.generate import generate_many
from unmask.decoding.layout import layout_for
from unmask.decoding.options import DecodeOptions
from unmask.diffusion.objective import continuation_nll, denoiser_logits, token_nll
from unmask.errors import UnmaskError

log = logging.getLogger(__name__)

try:  # register with the harness when it is installed
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model
except ImportError:
    _Base = object

    def register_model(*names):
        return lambda cls: cls


@torch.no_grad()
def greedy_matches(model, prefix: Sequence[int], target: Sequence[int]) -> bool:
    """Would greedy decoding (argmax, most confident position first) of the masked continuation give `target`?"""
    c = model.config
    device = model.output.weight.device
    P, L = len(prefix), len(target)
    if not layout_for(c).diffusion:
        seq = torch.tensor([list(prefix) + list(target)], device=device)
        return bool((model(seq[:, :-1])[0, P - 1 :].argmax(-1) == seq[0, P:]).all())
    x = torch.tensor([list(prefix) + [c.mask_id] * L], device=device)
    for _ in range(L):
        logits = model(x)[0, P:].float()
        prob, tok = logits.softmax(-1).max(-1)
        still = x[0, P:] == c.mask_id
        i = int(torch.where(still, prob, torch.full_like(prob, -1.0)).argmax())
        x[0, P + i] = tok[i]
    return x[0, P:].tolist() == list(target)


def _parse(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _register(cls):
    try:
        return register_model("unmask")(cls)
    except ValueError:  # already registered: this module was reloaded
        log.debug("lm-eval model 'unmask' is already registered")
        return cls


@_register
class UnmaskLM(_Base):
    """`pretrained`: a model folder (or pass `pipeline=` a loaded Pipeline). Decoding options for generation
    (block_length, steps, policy, threshold, temperature, cache ...) are accepted as model_args."""

    def __init__(self, pretrained: str | None = None, pipeline=None, device: str | None = None,
                 dtype: str | None = None, mc_samples: int = 32, batch_size: int | str = 16,
                 greedy_check: bool = True, max_new_tokens: int = 256, seed: int = 0, **decode: Any):
        if _Base is not object:
            super().__init__()
        if pipeline is None:
            if pretrained is None:
                raise UnmaskError("UnmaskLM needs pretrained=PATH (a model folder) or pipeline=")
            pipeline = unmask.load(pretrained, device=device, dtype=dtype)
        self.pipe = pipeline
        self.mc_samples = int(mc_samples)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> default
        self.greedy_check = bool(greedy_check)
        self.seed = seed
        decode = {k: _parse(v) for k, v in decode.items() if k in DecodeOptions.fields() and k != "stop"}
        self.options = DecodeOptions(max_new_tokens=int(max_new_tokens), seed=seed).replace(**decode)
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "UnmaskLM":
        args = {}
        for part in filter(None, (p.strip() for p in arg_string.split(","))):
            key, _, value = part.partition("=")
            args[key.strip()] = _parse(value.strip())
        return cls.create_from_arg_obj(args, additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "UnmaskLM":
        """The harness's batch_size / device fill in what model_args leaves out; model_args win."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "max_batch_size"}
        return cls(**{**extra, **arg_dict})

    # --- helpers --------------------------------------------------------------------------------
    @property
    def model(self):
        return self.pipe.model

    @property
    def max_length(self) -> int:
        return self.pipe.config.max_seq_len

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """As the harness does: trailing spaces of the context move to the continuation, and the continuation
        is what encoding the whole adds to the context's tokens (so BPE merges across the seam are kept)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        enc = self.pipe.tokenizer.encode
        whole, ctx = enc(context + continuation), enc(context)
        if whole[: len(ctx)] != ctx:  # the seam merged differently: fall back to separate encodings
            return ctx, enc(continuation)
        return ctx, whole[len(ctx) :]

    def _prefix(self, ctx: list[int], n_target: int) -> list[int]:
        if not ctx:  # condition on BOS/EOS like the harness's empty-context convention
            tok = self.pipe.tokenizer
            ctx = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
        room = self.max_length - n_target
        if room < 1:
            raise ValueError(f"continuation of {n_target} tokens does not fit the context of {self.max_length}")
        return ctx[-room:]

    # --- the harness API -------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args[0], req.args[1]
            ctx, target = self._encode_pair(context, continuation)
            target = target[-(self.max_length - 1) :]
            prefix = self._prefix(ctx, len(target))
            nll = continuation_nll(self.model, prefix, target, self.mc_samples, self.batch_size, self._generator)
            greedy = greedy_matches(self.model, prefix, target) if self.greedy_check and target else False
            out.append((-nll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        window = self.max_length - 1  # one slot for the BOS/EOS the first window conditions on
        for req in requests:
            ids = self.pipe.tokenizer.encode(req.args[0])
            total = 0.0
            for lo in range(0, len(ids), window):
                target = ids[lo : lo + window]
                total += continuation_nll(self.model, self._prefix(ids[max(0, lo - 1) : lo], len(target)), target,
                                          self.mc_samples, self.batch_size, self._generator)
            out.append(-total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The model's answers, `batch_size` requests decoded together, each with its own settings, cut at
        each request's `until` strings."""
        prompts, request_options = [], []
        for req in requests:
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            changes: dict[str, Any] = {"stop": until,
                                       "max_new_tokens": int(gen_kwargs.pop("max_gen_toks", self.options.max_new_tokens))}
            if gen_kwargs.get("do_sample") is False:
                changes["temperature"] = 0.0
            elif "temperature" in gen_kwargs:
                changes["temperature"] = float(gen_kwargs["temperature"])
            if gen_kwargs.get("top_p") is not None and changes.get("temperature", self.options.temperature) > 0:
                changes["top_p"] = float(gen_kwargs["top_p"])
            options = self.options.replace(**changes)
            ids = self.pipe.tokenizer.encode(context)
            keep = self.max_length - options.max_new_tokens
            if keep < 1:
                raise ValueError(f"max_gen_toks {options.max_new_tokens} leaves no room for context in {self.max_length}")
            if len(ids) > keep:
                log.warning("context of %d tokens cut to its last %d", len(ids), keep)
                ids = ids[-keep:]
            prompts.append(ids)
            request_options.append(options)
        out: list[str] = [""] * len(prompts)
        for i, result in generate_many(self.pipe, prompts, request_options, max_batch=self.batch_size):
            out[i] = result.text
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.pipe.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.pipe.tokenizer.chat_template or ""

    @property
    def tokenizer_name(self) -> str:
        return str(self.pipe.path or "unmask").replace("/", "__")


def run_harness_cli(args: list[str]) -> None:
    """lm-eval's own command line with the "unmask" model registered: the harness looks models up only in its
    own package, so a bare `lm_eval --model unmask` cannot see this one."""
    if _Base is object:
        raise UnmaskError("lm-eval is not installed: pip install 'unmask[eval]' (or lm-eval)")
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    cli_evaluate()
