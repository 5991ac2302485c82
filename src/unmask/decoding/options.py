"""Decoding options shared by the CLI, the Python API, the edit tools and the server."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.decoding.params import OptionsError
from unmask.decoding.policies import POLICIES, declared_params, param_problem

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API


@dataclass
class DecodeOptions:
    max_new_tokens: int = 128
    block_length: int = 32
    steps: int | None = None  # total denoising steps for fixed-step policies (None = max_new_tokens)
    policy: str = "threshold"  # a name in decoding/policies.py's POLICIES
    # the knobs of the built-in policies (each declared, with its range, by the policy class)
    threshold: float = 0.9  # confidence threshold τ for the threshold and leftmost policies
    factor: float = 1.0  # f of the factor policy
    entropy_bound: float = 0.5  # γ of the eb policy: error (-log confidence) a step may add beyond its surest token
    policy_params: dict[str, float] = field(default_factory=dict)  # knobs of other registered policies, by name
    confidence: str = "prob"  # prob | margin | entropy | random
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0  # OpenAI semantics: logit -= presence * [token already generated]
    frequency_penalty: float = 0.0  # ... - frequency * (times it was generated); counters repetition loops
    seed: int | None = None
    cache: str = "prefix"  # none | prefix | dual
    cache_refresh: int = 0  # refresh the cache every N steps inside a block (0 = only at each new block)
    early_stop: bool = True  # stop once a finished block holds EOS
    self_correct: bool = False
    remask_below: float = 0.4  # self-correction: re-mask committed tokens whose probability falls below
    rewrite_above: float = 0.9  # self-correction: rewrite a committed token when a new argmax beats this
    max_correction_steps: int = 8
    stop: list[str] = field(default_factory=list)
    heal: bool = True  # token healing of text prompts (decoding/healing.py); ids are decoded as given
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: added to a token's logit, [-100, 100]
    logprobs: int | None = None  # record each new token's log-probability (+ this many alternatives); None: off

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise OptionsError(msg)

        need(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        need(self.block_length >= 1, f"block_length must be >= 1, got {self.block_length}")
        need(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            need(-2.0 <= getattr(self, name) <= 2.0, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        need(self.cache in ("none", "prefix", "dual"), f"cache must be none, prefix or dual, got {self.cache!r}")
        need(self.confidence in ("prob", "margin", "entropy", "random"), f"unknown confidence {self.confidence!r}")
        need(self.max_correction_steps >= 0, "max_correction_steps must be >= 0")
        need(self.policy in POLICIES, f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        declared = declared_params()
        own = [k for k in declared if k not in self.__dataclass_fields__]
        unknown = [k for k in self.policy_params if k not in own]
        need(not unknown, f"policy_params: {', '.join(map(repr, unknown))} is no registered policy's own parameter "
                          f"(those are: {', '.join(own) or 'none'})")
        for name in declared:  # every knob, not only the chosen policy's: a bad value is wrong whoever reads it
            problem = param_problem(name, self.param(name), self.policy)
            if problem:
                raise OptionsError(problem)
        need(not (self.policy == "verify" and self.self_correct),
             "self_correct does not apply to the verify policy: every token it commits is already the AR base's")
        need(self.cache_refresh >= 0, f"cache_refresh must be >= 0, got {self.cache_refresh}")
        need(self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        for token, bias in self.logit_bias.items():
            need(isinstance(token, int) and token >= 0, f"logit_bias: token ids must be integers >= 0, got {token!r}")
            need(-100.0 <= bias <= 100.0, f"logit_bias: bias of token {token} must be in [-100, 100], got {bias}")

    def param(self, name: str) -> Any:
        """Option `name`: a field, or a registered policy's knob from policy_params (else its declared default)."""
        if name in self.__dataclass_fields__:
            return getattr(self, name)
        return self.policy_params.get(name, declared_params()[name].default)

    def replace(self, **changes: Any) -> "DecodeOptions":
        """A copy with `changes`; a registered policy's knob that has no field of its own goes to policy_params."""
        knobs = [k for k in changes if k not in self.__dataclass_fields__ and k in declared_params()]
        if knobs:
            own = {k: changes.pop(k) for k in knobs}
            changes["policy_params"] = {**changes.get("policy_params", self.policy_params), **own}
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields(cls) -> set[str]:
        """Every option name `replace` takes: the fields and the registered policies' knobs."""
        return {f.name for f in dataclasses.fields(cls)} | set(declared_params())


GENERATION_CONFIG = "generation_config.json"
# keys of a Hugging Face generation_config.json we take as decoding defaults (the rest — token ids, beam
# settings, a published family's own sampler knobs — are ignored)
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
DEFAULT_KEYS = SAMPLING_KEYS + ("max_new_tokens", "presence_penalty", "frequency_penalty", "block_length", "policy",
                                "cache")


def default_keys() -> tuple[str, ...]:
    """DEFAULT_KEYS and every registered policy's knobs (threshold, entropy_bound, ...), each a top-level key."""
    return DEFAULT_KEYS + tuple(declared_params())


def generation_defaults(folder: str | Path) -> DecodeOptions:
    """A model folder's recommended decoding: its generation_config.json over DecodeOptions' defaults.
    As in transformers, `do_sample: false` means greedy whatever the temperature says."""
    path = Path(folder) / GENERATION_CONFIG
    if not path.is_file():
        return DecodeOptions()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise OptionsError(f"{path}: not valid JSON ({e})") from None
    keys = tuple(k for k in default_keys() if raw.get("do_sample", True) or k not in SAMPLING_KEYS)
    values = {k: raw[k] for k in keys if raw.get(k) is not None}
    try:
        return DecodeOptions().replace(**values)
    except (OptionsError, TypeError) as e:
        raise OptionsError(f"{path}: {e}") from None


def save_generation_defaults(options: DecodeOptions, folder: str | Path) -> None:
    """Write the options that differ from DecodeOptions' defaults as generation_config.json (if any)."""
    base = DecodeOptions()
    values = {k: options.param(k) for k in default_keys() if options.param(k) != base.param(k)}
    if values:
        from unmask.io import atomic_path

        values["do_sample"] = options.temperature > 0
        with atomic_path(Path(folder) / GENERATION_CONFIG) as tmp:
            Path(tmp).write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


for _p in declared_params().values():  # a knob with a field of its own keeps one default, the policy's
    assert DecodeOptions().param(_p.name) == _p.default, f"{_p.name}: DecodeOptions and its policy differ"
