"""OpenAI's `logprobs` objects from the engine's per-token log-probabilities.

Completions answer in the legacy form ({tokens, token_logprobs, top_logprobs, text_offset}); chat in the
current one ({content: [{token, logprob, bytes, top_logprobs}]}). A streamed answer is formatted run by run
(each chunk carries the tokens its text delta completed), so one formatter keeps the running count and text
offset of an answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from unmask.decoding.sampling import TokenLogprob
from unmask.serve.text import unheal
from unmask.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -Infinity: an impossible token gets this, as vLLM reports it


def _lp(value: float | None) -> float:
    return FLOOR if value is None else max(float(value), FLOOR)


def token_piece(tokenizer: Tokenizer, token: int) -> tuple[str, bytes]:
    """(text, bytes) of one token. A token holding part of a UTF-8 character is named by its bytes,
    "bytes:\\xe2\\x86", as OpenAI names them."""
    raw = tokenizer.token_bytes(token)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


class LogprobFormat:
    """Formats successive runs of one answer's tokens. `skip`: a healed prompt's text, not part of the
    answer, taken off the first token's text; `offset`: where the answer starts in the choice's text (after
    an echoed prompt)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool, skip: str = "", offset: int = 0):
        self.tokenizer, self.chat, self.skip, self.start = tokenizer, chat, skip, offset
        self.tokens: list[int] = []  # formatted so far

    def offset(self) -> int:
        """Where the next token's text starts in the choice's text: the answer so far, decoded whole (a
        character split over tokens counts once; a token inside one points past it)."""
        return self.start + len(unheal(self.tokenizer.decode(self.tokens), self.skip))

    def piece(self, token: int) -> tuple[str, bytes]:
        text, raw = token_piece(self.tokenizer, token)
        if not self.tokens and self.skip:  # the healed first token: only its answer part
            text = unheal(self.tokenizer.decode([token]), self.skip)
            raw = text.encode("utf-8")
        return text, raw

    def __call__(self, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict:
        pieces, offsets = [], []
        for t in tokens:
            offsets.append(self.offset())
            pieces.append(self.piece(t))
            self.tokens.append(t)
        entries = [e if e is not None else (None, []) for e in entries]
        alternatives = [[(*token_piece(self.tokenizer, a), alp) for a, alp in top] for _, top in entries]
        if self.chat:
            return {"content": [
                {"token": text, "logprob": _lp(lp), "bytes": list(raw),
                 "top_logprobs": [{"token": t, "logprob": _lp(alp), "bytes": list(r)} for t, r, alp in alts]}
                for (text, raw), (lp, _), alts in zip(pieces, entries, alternatives)]}
        return {"tokens": [text for text, _ in pieces], "token_logprobs": [_lp(lp) for lp, _ in entries],
                # legacy completions list the chosen token with the alternatives (it wins a name clash)
                "top_logprobs": [{**{t: _lp(alp) for t, _, alp in alts}, text: _lp(lp)}
                                 for (text, _), (lp, _), alts in zip(pieces, entries, alternatives)],
                "text_offset": offsets}
