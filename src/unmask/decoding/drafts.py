"""Drafts copied from the context, for the verify policy (policies.py).

Code repeats itself: a name defined in the prompt is used again, a line's shape comes back a few lines
later. Where the text just committed ends with tokens seen before in the canvas, the tokens that followed
them last time are a good guess for what comes next (prompt-lookup decoding, Saxena 2023). The verify
policy commits a draft token only where the model itself agrees, so a wrong copy costs nothing but the
positions it occupied; a right one saves a step per token.
"""

from __future__ import annotations

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
