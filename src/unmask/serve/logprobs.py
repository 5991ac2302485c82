"""OpenAI's `logprobs` objects from the engine's per-token log-probabilities.

Completions answer in the legacy form ({tokens, token_logprobs, top_logprobs, text_offset}); chat in the
current one ({content: [{token, logprob, bytes, top_logprobs}]}). A streamed answer is formatted run by run
(each chunk carries the tokens its text delta completed), so one formatter keeps the running count and text
offset of an answer.

Token healing re-decodes the prompt's last token as the answer's first (decoding/healing.py): that token and
its alternatives are reported as the text the client sees, the prompt's part taken off; alternatives that do
not extend the prompt's last token could not come first and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence

from unmask.decoding.detokenize import unheal
from unmask.decoding.sampling import TokenLogprob
from unmask.tokenizer import Tokenizer

FLOOR = -9999.0  # JSON has no -Infinity: an impossible token gets this, as vLLM reports it


def _lp(value: float | None) -> float:
    return FLOOR if value is None else max(float(value), FLOOR)


def bytes_piece(raw: bytes) -> tuple[str, bytes]:
    """(text, bytes) of a token's bytes. Part of a UTF-8 character is named by its bytes, "bytes:\\xe2\\x86",
    as OpenAI names them."""
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


def token_piece(tokenizer: Tokenizer, token: int) -> tuple[str, bytes]:
    """(text, bytes) of one token."""
    return bytes_piece(tokenizer.token_bytes(token))


class LogprobFormat:
    """Formats successive runs of one answer's tokens. `skip`: a healed prompt's text, not part of the
    answer, taken off the first token's text; `offset`: where the answer starts in the choice's text (after
    an echoed prompt)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool, skip: str = "", offset: int = 0):
        self.tokenizer, self.chat, self.skip, self.start = tokenizer, chat, skip, offset
        self.skip_bytes = skip.encode("utf-8")
        self.tokens: list[int] = []  # formatted so far

    def offset(self) -> int:
        """Where the next token's text starts in the choice's text: the answer so far, decoded whole (a
        character split over tokens counts once; a token inside one points past it)."""
        return self.start + len(unheal(self.tokenizer.decode(self.tokens), self.skip))

    def healed_piece(self, token: int) -> tuple[str, bytes] | None:
        """A token at the healed position as the client sees it: without the prompt's last token's text.
        None: it does not extend that text, so healing never lets it come first."""
        raw = self.tokenizer.token_bytes(token)
        return bytes_piece(raw[len(self.skip_bytes):]) if raw.startswith(self.skip_bytes) else None

    def pieces(self, token: int, top: list) -> tuple[tuple[str, bytes], list[tuple[str, bytes, float]]]:
        """((text, bytes) of the token, (text, bytes, logprob) of its alternatives)."""
        if self.skip and not self.tokens:  # the healed first token
            alternatives = [(*p, alp) for a, alp in top if (p := self.healed_piece(a)) is not None]
            return self.healed_piece(token) or ("", b""), alternatives
        return token_piece(self.tokenizer, token), [(*token_piece(self.tokenizer, a), alp) for a, alp in top]

    def __call__(self, tokens: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict:
        entries = [e if e is not None else (None, []) for e in entries]
        entries += [(None, [])] * (len(tokens) - len(entries))  # none known: FLOOR, as for a None entry
        pieces, alternatives, offsets = [], [], []
        for t, (_, top) in zip(tokens, entries):
            offsets.append(self.offset())
            piece, alts = self.pieces(t, top)
            pieces.append(piece)
            alternatives.append(alts)
            self.tokens.append(t)
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
