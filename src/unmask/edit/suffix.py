"""Filling a gap with a left-to-right model by reading the text after it: propose, then score the suffix.

A model that attends causally (an AR model, or the default model: its AR base plus a look-ahead adapter that
acts only at [MASK] inputs) never sees the text after a gap while it writes. It can still *read* it: the
probability it gives the suffix after a candidate middle says how well that middle leads into it.

    1. the prefix runs once; its K/V are kept (`Prefix`);
    2. proposals: a few continuations of the prefix decoded together from that cache, one greedy and the
       rest sampled (`propose`); each is cut where a middle may end (`Ending`: before a newline, where the
       suffix's first characters follow, ...), which gives one or more candidate middles;
    3. every candidate is scored by log p(first `suffix_tokens` tokens of the suffix | prefix, middle)
       + MIDDLE_WEIGHT · log p(middle | prefix), all in one batched pass on the cached prefix (`score`); the
       best wins.

The candidates are samples of p(middle | prefix); weighting them by how probable they make the suffix is the
posterior p(middle | prefix, suffix) over them: the suffix term is what prefix-only decoding lacks. More
proposals come from a second context where the suffix is shown before the prefix, so the base can copy
names from it; they are scored after the true prefix like every other. Clean tokens never meet the adapter, so every number here is the AR base's own.
"""

from __future__ import annotations

import bisect
import functools
import keyword
import math
import re
from dataclasses import dataclass, field

import torch

from unmask.decoding.layout import layout_for
from unmask.edit.canvas import encode_literal, encode_with_offsets
from unmask.edit.spans import EditError
from unmask.edit.static import faults
from unmask.model.transformer import KVCache

SAMPLES = 5  # proposals per gap: one greedy, the rest sampled
TEMPERATURE = 0.8  # of the sampled proposals: varied, still plausible
HINT_SAMPLES = 3  # proposals decoded with the suffix shown before the prefix
HINT_TOKENS = 96  # suffix tokens shown there
SUFFIX_TOKENS = 24
# weight of log p(middle | prefix) next to log p(suffix | prefix, middle). The candidates are already drawn
# from p(middle | prefix), so the suffix term alone reranks them by the posterior; the full joint (1.0)
# prefers short middles (every token costs probability). A little of the middle term keeps odd candidates out
MIDDLE_WEIGHT = 0.3  # suffix tokens scored after each candidate: enough to tell a name, a key, a return apart
ROW_BATCH = 16  # candidates scored per forward pass


def reads_left_to_right(config) -> bool:
    """Clean text is read causally (an AR model, or block-causal with causal blocks): suffix scoring applies,
    and diffusion-style denoising cannot see past a gap."""
    return layout_for(config).left_to_right


# --- where a middle may end ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Ending:
    """Where a proposal may be cut into a candidate middle, given the text after the gap.

    A middle never holds more than `max_newlines` newlines. If the suffix starts a new line (or there is none),
    a middle ends before a newline of the proposal; otherwise where the proposal goes on with the suffix's own
    first characters (`key`), so `len(<<<vaules>>>)` ends before the `)` the proposal writes."""

    suffix: str
    max_newlines: int = 0

    @property
    def at_line_end(self) -> bool:
        return self.suffix == "" or self.suffix[0] in "\r\n"

    @property
    def key(self) -> str:
        # the suffix's first characters up to its first word's end: specific enough, short enough to reappear
        m = re.match(r"\s*(\w+|[^\w\s]{1,2})", self.suffix)
        return m.group(0) if m else self.suffix[:1]

    def cuts(self, text: str) -> list[str]:
        """Candidate middles in a proposal (without duplicates, shortest first)."""
        limit = _nth_newline(text, self.max_newlines + 1)
        scope = text[:limit] if limit >= 0 else text
        if self.at_line_end:
            ends = [m.start() for m in re.finditer(r"\r?\n", text[: limit + 1])] if limit >= 0 else []
            if self.suffix == "" and limit < 0:  # the end of the text: the proposal's own end is one too
                ends.append(len(text))
        else:
            key = self.key
            ends = [i for i in range(len(scope) + 1) if text.startswith(key, i)]
        return list(dict.fromkeys(text[:e] for e in ends if e > 0 and text[:e].strip()))

    def finished(self, text: str) -> bool:
        """Enough of a proposal has been written: later text cannot give another candidate."""
        return _nth_newline(text, self.max_newlines + 1) >= 0


def _nth_newline(text: str, n: int) -> int:
    """Index of the n-th newline (1-based) of text, -1 if it has fewer."""
    pos = -1
    for _ in range(n):
        pos = text.find("\n", pos + 1)
        if pos < 0:
            return -1
    return pos


# --- the cached prefix --------------------------------------------------------------------------------

@dataclass
class Prefix:
    """The prefix's K/V (slots [0, length) of a one-row cache) and the raw next-token logits after it."""

    cache: KVCache
    length: int
    next_logits: torch.Tensor  # [V] float32: the distribution of the token after the prefix

    def rows(self, model, n: int, room: int) -> KVCache:
        """A cache of n rows holding this prefix, with `room` free slots after it."""
        P = self.length
        cache = model.new_cache(n, P + room)
        cache.k[:, :, :, :P] = self.cache.k[:, :1, :, :P]
        cache.v[:, :, :, :P] = self.cache.v[:, :1, :, :P]
        return cache


def raw_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits from hidden states: output j predicts token j + 1 whatever config.logits_shift says
    (the shift would drop the last position, which is the one a continuation needs)."""
    return model.output(hidden).float()


@torch.no_grad()
def run_prefix(model, ids: list[int], room: int) -> Prefix:
    """Run the prefix once into a cache with `room` slots after it."""
    if not ids:
        raise EditError("suffix scoring needs at least one token before the gap")
    cache = model.new_cache(1, len(ids) + room)
    x = torch.tensor([ids], device=model.output.weight.device)
    hidden = model(x, cache=cache, cache_start=0, return_hidden=True)
    return Prefix(cache, len(ids), raw_logits(model, hidden[:, -1:])[0, 0])


def prefix_from_cache(model, cache: KVCache, length: int, next_hidden: torch.Tensor) -> Prefix:
    """A Prefix made of slots [0, length) of a cache already filled (auto mode's one pass over the text)."""
    return Prefix(cache, length, raw_logits(model, next_hidden[None, None])[0, 0])


# --- proposals ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: byte -> the character that stands for it in token strings (GPT-2)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level(text: str) -> str:
    table = _byte_chars()
    return "".join(table[b] for b in text.encode("utf-8"))


class ForcedText:
    """Restricts the first tokens of a proposal to ones that spell `text` (the healed end of the prefix): a
    token that is a prefix of what remains, or one that starts with all of it."""

    def __init__(self, tokenizer, vocab_size: int):
        from unmask.decoding.healing import _sorted_vocab

        self.strings, self.ids, _ = _sorted_vocab(tokenizer)
        self.by_string = dict(zip(self.strings, self.ids))
        self.string_of = dict(zip(self.ids, self.strings))
        self.vocab_size = vocab_size

    def allowed(self, remaining: str) -> torch.Tensor:
        """bool [V] of the tokens allowed when `remaining` (byte-level) is still to be spelled."""
        ok = torch.zeros(self.vocab_size, dtype=torch.bool)
        for i in range(1, len(remaining) + 1):
            t = self.by_string.get(remaining[:i])
            if t is not None and t < self.vocab_size:
                ok[t] = True
        lo = bisect.bisect_left(self.strings, remaining)
        hi = bisect.bisect_left(self.strings, remaining + "\U0010ffff", lo=lo)
        ok[[t for t in self.ids[lo:hi] if t < self.vocab_size]] = True
        return ok

    def after(self, remaining: str, token: int) -> str:
        s = self.string_of.get(token, "")
        return remaining[len(s):] if len(s) < len(remaining) else ""


@dataclass
class Proposal:
    text: str  # what the proposal wrote after the prefix (the forced text taken off)
    tokens: list[int] = field(default_factory=list)


@torch.no_grad()
def propose(model, tokenizer, prefix: Prefix, forced: str, ending: Ending, samples: int, max_tokens: int,
            banned: set[int], ends: set[int], temperature: float = TEMPERATURE, seed: int = 0
            ) -> tuple[list[Proposal], int]:
    """`samples` continuations of the prefix decoded together (row 0 greedy, the others sampled), each
    starting with `forced` and stopping once `ending` has seen enough, at an end token, or at `max_tokens`.
    Returns the proposals and the forward passes spent."""
    c = model.config
    n = max(1, samples)
    cache = prefix.rows(model, n, max_tokens)
    V = prefix.next_logits.shape[-1]
    never = torch.zeros(V, dtype=torch.bool)
    never[[b for b in banned if b < V]] = True
    spell = ForcedText(tokenizer, V) if forced else None
    remaining = [byte_level(forced)] * n
    tokens: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    gen = torch.Generator().manual_seed(seed)
    logits = prefix.next_logits[None].expand(n, -1).clone()
    passes = 0
    for step in range(max_tokens):
        choice = _choose(logits.cpu(), never, remaining, spell, temperature, gen)
        for r in range(n):
            if done[r]:
                continue
            t = int(choice[r])
            if t in ends:
                done[r] = True
                continue
            tokens[r].append(t)
            if spell is not None and remaining[r]:
                remaining[r] = spell.after(remaining[r], t)
            text = tokenizer.decode(tokens[r])
            if not remaining[r] and ending.finished(text[len(forced):]):
                done[r] = True
        if all(done) or step == max_tokens - 1:
            break
        x = choice[:, None].to(cache.k.device)
        hidden = model(x, cache=cache, cache_start=prefix.length + step, return_hidden=True)
        logits = raw_logits(model, hidden)[:, 0]
        passes += 1
    out = []
    for row in tokens:
        text = tokenizer.decode(row)
        out.append(Proposal(text[len(forced):] if text.startswith(forced) else "", row))
    return out, passes


def _choose(logits: torch.Tensor, never: torch.Tensor, remaining: list[str], spell: ForcedText | None,
            temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Row 0 greedy, the others sampled at `temperature`, within what each row may write next."""
    logits = logits.masked_fill(never, -math.inf)
    for r, rest in enumerate(remaining):
        if rest and spell is not None:
            logits[r] = logits[r].masked_fill(~spell.allowed(rest), -math.inf)
    greedy = logits.argmax(-1)
    if logits.shape[0] == 1 or temperature <= 0:
        return greedy
    probs = (logits / temperature).softmax(-1)
    sampled = torch.multinomial(probs, 1, generator=gen)[:, 0]
    sampled[0] = greedy[0]
    return sampled


# --- scoring ------------------------------------------------------------------------------------------

@torch.no_grad()
def score(model, tokenizer, prefix: Prefix, texts: list[str], pad_id: int, splits: list[int] | None = None
          ) -> tuple[list[float], int] | tuple[list[tuple[float, float]], int]:
    """log p(text | prefix) for each text (tokenized on its own), in batched passes on the cached prefix.
    With `splits` (a character index per text): (log p of the tokens before it, log p of those from it on)
    instead, a token counted where it starts. Returns the scores and the forward passes spent."""
    encoded = [encode_with_offsets(tokenizer, t) for t in texts]
    parts = [(0.0, 0.0)] * len(texts)
    first = prefix.next_logits.log_softmax(-1)
    passes = 0
    for lo in range(0, len(texts), ROW_BATCH):
        chunk = [ids for ids, _ in encoded[lo : lo + ROW_BATCH]]
        width = max(1, max(len(ids) for ids in chunk))
        cache = prefix.rows(model, len(chunk), width)
        x = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in chunk], device=cache.k.device)
        hidden = model(x, cache=cache, cache_start=prefix.length, return_hidden=True)
        passes += 1
        logp = raw_logits(model, hidden[:, :-1]).log_softmax(-1).cpu() if width > 1 else None
        for r, ids in enumerate(chunk):
            if not ids:
                continue
            each = torch.empty(len(ids))
            each[0] = first[ids[0]]
            if len(ids) > 1:
                each[1:] = logp[r, torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
            split = splits[lo + r] if splits is not None else len(texts[lo + r])
            before = torch.tensor([start < split for start, _ in encoded[lo + r][1]])
            parts[lo + r] = (float(each[before].sum()), float(each[~before].sum()))
    if splits is None:
        return [a + b for a, b in parts], passes
    return parts, passes


# --- one gap ------------------------------------------------------------------------------------------

@dataclass
class GapChoice:
    middle: str  # the winning middle
    score: float  # its log p(middle + suffix head | prefix)
    candidates: dict[str, float]  # every candidate scored, with its score
    passes: int  # forward passes spent (prefix, proposals, scoring)
    tokens: int  # tokens of the winning middle


NAME_CANDIDATES = 8  # names of the suffix's head offered as middles of a gap inside a line


def names_from(prefix: str, suffix_head: str) -> list[str]:
    """A gap inside a started line (`import ▢`, `{"▢": 8080}`, `len(▢)`) is often a name the text after it
    uses: the suffix head's identifiers, first seen first, are candidates too (the scores choose)."""
    line = prefix[prefix.rfind("\n") + 1 :]
    if not line.strip():
        return []
    names = [n for n in re.findall(r"[A-Za-z_]\w*", suffix_head) if not keyword.iskeyword(n)]
    return list(dict.fromkeys(names))[:NAME_CANDIDATES]


def fitting(prefix: str, suffix: str, candidates: list[str]) -> list[str]:
    """Where some candidate makes the whole text valid Python, only those that do, and of them those with
    the fewest static faults (edit/static.py: names left unbound, a used function that returns nothing): a
    middle must not break code that works. Text that is not Python (nothing parses) keeps every candidate."""
    counted = {m: n for m in candidates if (n := faults(prefix + m + suffix)) is not None}
    if not counted:
        return candidates
    fewest = min(counted.values())
    return [m for m in candidates if counted.get(m) == fewest]


def healed_prefix(tokenizer, prefix: str, room: int, max_len: int, fallback_id: int) -> tuple[list[int], str]:
    """(ids the model reads, text it must write first). The prefix's trailing whitespace and last token are
    written again by the proposals, as training text had them: "\\n    " is one token with what follows."""
    body = prefix.rstrip()
    ids, offsets = encode_with_offsets(tokenizer, body)
    cut = len(body)
    if len(ids) >= 2:
        start = offsets[-1][0]
        keep = len(ids) - 1
        while keep > 0 and offsets[keep - 1][1] > start:  # a character split over tokens stays whole
            keep -= 1
        ids, cut = ids[:keep], offsets[keep][0] if keep < len(offsets) else cut
    elif ids:
        ids, cut = [], 0
    ids = ids[-(max_len - room):] if len(ids) > max_len - room else ids
    return (ids or [fallback_id]), prefix[cut:]


def hint_ids(tokenizer, suffix: str, prefix_ids: list[int]) -> list[int]:
    """The suffix's beginning, a blank line, then the prefix: a context in which the base can copy from what
    follows the gap."""
    hint = suffix_head(tokenizer, suffix.strip("\n"), HINT_TOKENS)
    return encode_literal(tokenizer, hint + "\n\n\n") + prefix_ids


def document_start(tokenizer, config) -> int:
    """The token a text starts after when nothing precedes it: the document separator if the tokenizer has
    one (what the base saw before every file in training), else BOS, else EOS."""
    sep = tokenizer.special.get("<|endoftext|>")
    return sep if sep is not None else (config.bos_id if config.bos_id is not None else config.eos_id)


def suffix_head(tokenizer, suffix: str, n: int) -> str:
    """The suffix's first n tokens, as text."""
    ids, offsets = encode_with_offsets(tokenizer, suffix)
    return suffix if len(ids) <= n else suffix[: offsets[n - 1][1]]


def fill_gap(pipe, prefix: str, suffix: str, ending: Ending, max_tokens: int = 64, samples: int = SAMPLES,
             suffix_tokens: int = SUFFIX_TOKENS, extra: list[str] = (), seed: int = 0,
             state: tuple[Prefix, str] | None = None, hint_samples: int = HINT_SAMPLES,
             suffix_names: bool = True) -> GapChoice:
    """The best middle between prefix and suffix (module docstring). `extra`: more candidates to score with
    the proposals' (auto mode: the original text). `state`: an already cached prefix and the text to force.
    `hint_samples`: proposals more, decoded after a copy of the suffix placed before the prefix.
    `suffix_names`: the suffix's names are candidates too (names_from); not where the suffix may itself hold
    the typo being fixed (auto mode), which copying would spread."""
    from unmask.edit.fill import special_ids

    model, tok, c = pipe.model, pipe.tokenizer, pipe.config
    head = suffix_head(tok, suffix, suffix_tokens)
    room = max_tokens + suffix_tokens + 16
    passes = 0
    if state is None:
        ids, forced = healed_prefix(tok, prefix, room, c.max_seq_len, document_start(tok, c))
        pre = run_prefix(model, ids, room)
        passes += 1
    else:
        pre, forced = state
        ids = encode_literal(tok, prefix[: len(prefix) - len(forced)])
    ends = {i for i in (c.eos_id, c.pad_id, tok.eos_id, 0) if i is not None}
    banned = special_ids(pipe) - ends
    proposals, n = propose(model, tok, pre, forced, ending, samples, max_tokens, banned, ends, seed=seed)
    passes += n
    if hint_samples and suffix.strip():
        # the same prefix after a copy of the suffix: names, keys and imports used after the gap are there to
        # copy. Only proposals come from this context; every score is read after the true prefix
        hinted_ids = hint_ids(tok, suffix, ids)
        hinted = run_prefix(model, hinted_ids[-(c.max_seq_len - max_tokens):], max_tokens)
        more, n = propose(model, tok, hinted, forced, ending, hint_samples, max_tokens, banned, ends, seed=seed + 1)
        proposals += more
        passes += n + 1
    cuts = [m for p in proposals for m in ending.cuts(p.text)]
    if prefix[-1:] in (" ", "\t"):  # the indentation is the prefix's: more of it breaks the line
        cuts = [m for m in cuts if m[:1] not in (" ", "\t")]
    names = names_from(prefix, head) if suffix_names else []
    candidates = list(dict.fromkeys(cuts + list(extra) + names))
    if not candidates:  # no proposal reached a place where the middle may end: the greedy one's first line
        line = next((line for line in proposals[0].text.split("\n") if line.strip()), "")
        candidates = [line.lstrip(" \t") if prefix[-1:] in (" ", "\t") else line]
    parts, n = score(model, tok, pre, [forced + m + head for m in candidates], c.pad_id,
                     splits=[len(forced + m) for m in candidates])
    passes += n
    scores = [MIDDLE_WEIGHT * middle + after for middle, after in parts]
    eligible = set(fitting(prefix, suffix, candidates))
    best = max((i for i, m in enumerate(candidates) if m in eligible), key=lambda i: scores[i])
    return GapChoice(candidates[best], scores[best], dict(zip(candidates, scores)), passes,
                     len(encode_literal(tok, candidates[best])))
