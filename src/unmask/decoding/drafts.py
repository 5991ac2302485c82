"""Drafts for the verify policy (policies.py): the proposer a drafting request feeds the model through.

Code repeats itself: a name defined in the prompt is used again, a line's shape comes back a few lines
later. Where the text just committed ends with tokens seen before in the canvas, the tokens that followed
them last time are a good guess for what comes next (prompt-lookup decoding, Saxena 2023). The verify
policy commits a draft token only where the model itself agrees, so a wrong copy costs nothing but the
positions it occupied; a right one saves a step per token.
"""

from __future__ import annotations

import torch

LONGEST_MATCH = 3  # suffix lengths tried, longest first: a longer match predicts better
SHORTEST_MATCH = 1


def copy_draft(context: list[int], length: int, longest: int = LONGEST_MATCH,
               shortest: int = SHORTEST_MATCH) -> list[int]:
    """Up to `length` tokens that followed the latest earlier occurrence of the context's last n tokens
    (n from `longest` down to `shortest`); [] if none occurs."""
    for n in range(min(longest, len(context) - 1), shortest - 1, -1):
        tail, last = context[-n:], context[-1]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start + n - 1] == last and context[start : start + n] == tail:
                return context[start + n : start + n + length]
    return []


class NoDrafts:
    """A request whose policy reads no drafts: the forward pass reads the canvas as it is."""

    follows = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fed(self, cur: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """What the forward pass read at the block's positions `pos` (`cur`: the block now)."""
        return cur

    def enter_block(self, pos: torch.Tensor) -> None:
        pass

    def propose(self, blk: list[int], pos: torch.Tensor, host: list[int], mask_id: int) -> int | None:
        """Drafts for the block's open positions; the first open canvas position, where a window may start
        (None: the window stays)."""
        return None

    def advance(self, pos: torch.Tensor, commit: torch.Tensor, next_inputs: torch.Tensor | None,
                tokens: torch.Tensor, cur: torch.Tensor, masked: torch.Tensor) -> None:
        pass


class Drafts(NoDrafts):
    """The proposer beside a drafting policy (verify), as vLLM keeps its n-gram proposer apart from the
    rejection sampler: the canvas as fed, with drafts at open positions — the model's look-ahead the policy
    hands back, or tokens copied from the committed text (`copy_draft`) where it has none."""

    def __init__(self, canvas: torch.Tensor):
        self.feed = canvas.clone()
        self.follows: torch.Tensor | None = None

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed

    def fed(self, cur: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.feed[pos]

    def enter_block(self, pos: torch.Tensor) -> None:
        self.follows = torch.ones_like(pos, dtype=torch.bool)
        self.follows[1:] = pos[1:] == pos[:-1] + 1

    def propose(self, blk: list[int], pos: torch.Tensor, host: list[int], mask_id: int) -> int | None:
        """Where the block's first open position has no draft from the model's look-ahead, copy one from the
        committed text before it over the open run there. Returns that position: the next window may start
        just before it, as every position before was fed its own token with only committed tokens before
        it, so its K/V are final."""
        fed = self.feed[pos].tolist()
        first = next((i for i, p in enumerate(blk) if host[p] == mask_id), None)
        if first is None:
            return None
        if fed[first] == mask_id:
            run = first + 1
            while run < len(blk) and blk[run] == blk[run - 1] + 1 and host[blk[run]] == mask_id:
                run += 1
            draft = copy_draft(host[: blk[first]], run - first)
            if draft:
                self.feed[pos[first : first + len(draft)]] = torch.tensor(draft, device=self.feed.device)
        return blk[first]

    def advance(self, pos: torch.Tensor, commit: torch.Tensor, next_inputs: torch.Tensor | None,
                tokens: torch.Tensor, cur: torch.Tensor, masked: torch.Tensor) -> None:
        """Committed positions are fed their tokens; open ones what the policy proposes next."""
        self.feed[pos] = torch.where(masked & ~commit, next_inputs, torch.where(commit, tokens, cur))


def drafts_for(drafting: bool, canvas: torch.Tensor) -> NoDrafts:
    """The proposer of a request whose policy drafts (policy.drafts), or the one that proposes nothing."""
    return Drafts(canvas) if drafting else NoDrafts()
