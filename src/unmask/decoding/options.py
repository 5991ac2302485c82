"""Decoding options shared by the CLI, the Python API, the edit tools and the server."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unmask.errors import UnmaskError


class OptionsError(UnmaskError, ValueError):
    pass


POLICY_NAMES = ("fixed", "threshold", "factor", "eb", "leftmost", "verify")  # decoding/policies.py registers one class each
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API


@dataclass
class DecodeOptions:
    max_new_tokens: int = 128
    block_length: int = 32
    steps: int | None = None  # total denoising steps for fixed-step policies (None = max_new_tokens)
    policy: str = "threshold"  # fixed | threshold | factor | eb | leftmost | verify (engine policies, chosen by name)
    threshold: float = 0.9  # confidence threshold τ for the threshold policy
    factor: float = 1.0  # f of the factor policy
    entropy_bound: float = 0.5  # γ of the eb policy: error (-log confidence) a step may add beyond its surest token
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
        need(0.0 < self.threshold <= 1.0, f"threshold must be in (0, 1], got {self.threshold}")
        need(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        need(self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            need(-2.0 <= getattr(self, name) <= 2.0, f"{name} must be in [-2, 2], got {getattr(self, name)}")
        need(self.cache in ("none", "prefix", "dual"), f"cache must be none, prefix or dual, got {self.cache!r}")
        need(self.confidence in ("prob", "margin", "entropy", "random"), f"unknown confidence {self.confidence!r}")
        need(self.max_correction_steps >= 0, "max_correction_steps must be >= 0")
        need(self.policy in POLICY_NAMES, f"policy must be one of {', '.join(POLICY_NAMES)}, got {self.policy!r}")
        need(not (self.policy == "verify" and self.self_correct),
             "self_correct does not apply to the verify policy: every token it commits is already the AR base's")
        need(self.factor > 0, f"factor must be > 0, got {self.factor}")
        need(self.entropy_bound >= 0, f"entropy_bound must be >= 0, got {self.entropy_bound}")
        need(self.cache_refresh >= 0, f"cache_refresh must be >= 0, got {self.cache_refresh}")
        need(self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")
        for token, bias in self.logit_bias.items():
            need(isinstance(token, int) and token >= 0, f"logit_bias: token ids must be integers >= 0, got {token!r}")
            need(-100.0 <= bias <= 100.0, f"logit_bias: bias of token {token} must be in [-100, 100], got {bias}")

    def replace(self, **changes: Any) -> "DecodeOptions":
        return dataclasses.replace(self, **changes)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}


GENERATION_CONFIG = "generation_config.json"
# keys of a Hugging Face generation_config.json we take as decoding defaults (the rest — token ids, beam
# settings, a published family's own sampler knobs — are ignored)
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
DEFAULT_KEYS = SAMPLING_KEYS + ("max_new_tokens", "presence_penalty", "frequency_penalty", "threshold",
                                "block_length", "policy", "cache", "entropy_bound")


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
    keys = DEFAULT_KEYS if raw.get("do_sample", True) else tuple(k for k in DEFAULT_KEYS if k not in SAMPLING_KEYS)
    values = {k: raw[k] for k in keys if raw.get(k) is not None}
    try:
        return DecodeOptions(**values)
    except (OptionsError, TypeError) as e:
        raise OptionsError(f"{path}: {e}") from None


def save_generation_defaults(options: DecodeOptions, folder: str | Path) -> None:
    """Write the options that differ from DecodeOptions' defaults as generation_config.json (if any)."""
    base = DecodeOptions()
    values = {k: getattr(options, k) for k in DEFAULT_KEYS if getattr(options, k) != getattr(base, k)}
    if values:
        from unmask.io import atomic_path

        values["do_sample"] = options.temperature > 0
        with atomic_path(Path(folder) / GENERATION_CONFIG) as tmp:
            Path(tmp).write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")
