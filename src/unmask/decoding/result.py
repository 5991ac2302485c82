"""What every decoder returns: the tokens plus the figures users compare engines by."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens only (prompt excluded), cut at EOS
    text: str = ""
    nfe: int = 0  # forward passes of the network
    steps: int = 0  # denoising steps (== nfe for uncached decoders)
    steps_per_block: list[int] = field(default_factory=list)
    seconds: float = 0.0
    finish_reason: str = "length"  # "eos" | "length" | "stop"
    prompt_tokens: int = 0
    healed_tokens: int = 0  # leading tokens that re-decode a healed prompt's last token (the prompt's, not new)
    # with options.logprobs: per token, its log-probability under the model when it was committed, and
    # the most likely alternatives then ([(token id, log-probability)], options.logprobs of them)
    logprobs: list[float | None] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def completion_tokens(self) -> int:
        """New tokens of the answer (what max_new_tokens counts)."""
        return len(self.tokens) - self.healed_tokens

    @property
    def tokens_per_step(self) -> float:
        return len(self.tokens) / max(self.steps, 1)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0
