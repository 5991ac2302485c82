"""What the model thinks of text it did not write: per-token probabilities and a length score.

token_probs        p(x_i | x with x_i masked): the signal auto mode uses to find typos and small bugs.
                   A masked-diffusion model is only trained to predict *masked* positions, so reading the
                   logits of unmasked tokens would be meaningless; each probed token is masked.
                   With `best=True` also the probability of the model's own top choice at each position.
"""

from __future__ import annotations

import torch

from unmask.diffusion.objective import denoiser_logits, token_nll
from unmask.model.transformer import Transformer


@torch.no_grad()
def token_probs(model: Transformer, ids: list[int], stride: int | None = None,
                batch: int = 16, best: bool = False) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor, int]:
    """(p(x_i | context) for every token as [L] float32 on the CPU, [with best: the top probability at each
    position,] number of forward passes).

    stride None  exact leave-one-out: one row per token, only that token masked.
    stride k     cheaper: k rows per window, row r masks every k-th token from r (k passes per window).
    Texts longer than the model context are probed in windows; each token is read from the window
    that centers it best.
    """
    c = model.config
    L = len(ids)
    probs = torch.zeros(L)
    top = torch.zeros(L)
    if L == 0:
        return (probs, top, 0) if best else (probs, 0)
    device = model.output.weight.device
    W = min(L, c.max_seq_len)
    x = torch.tensor(ids, device=device)
    # rows: (window start, positions masked in the row)
    rows: list[tuple[int, list[int]]] = []
    if stride is None:
        for i in range(L):
            rows.append((min(max(0, i - W // 2), L - W), [i]))
    else:
        starts = list(range(0, max(L - W, 0) + 1, max(W // 2, 1)))
        if starts[-1] != L - W:
            starts.append(L - W)
        owner = [min(starts, key=lambda s: abs(i - (s + W / 2))) for i in range(L)]
        for s in starts:
            mine = [i for i in range(s, s + W) if owner[i] == s]
            for r in range(stride):
                pos = [i for i in mine if i % stride == r]
                if pos:
                    rows.append((s, pos))
    for b in range(0, len(rows), batch):
        chunk = rows[b : b + batch]
        xb = torch.stack([x[s : s + W] for s, _ in chunk])
        for r, (s, pos) in enumerate(chunk):
            xb[r, [i - s for i in pos]] = c.mask_id
        p = model(xb).float().softmax(-1)
        for r, (s, pos) in enumerate(chunk):
            local = torch.tensor([i - s for i in pos], device=device)
            probs[pos] = p[r, local, x[pos]].cpu()
            top[pos] = p[r, local].max(-1).values.cpu()
    passes = -(-len(rows) // batch)
    return (probs, top, passes) if best else (probs, passes)
