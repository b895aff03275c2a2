"""Next-token cross-entropy over the output head without the full logits.

The logits of a training step are (tokens x vocabulary) floats, several copies of which live through softmax
and backward: at gpt2-124m, 2,048 tokens x 50,304 x 4 bytes = 393 MiB per copy, the same at every tier (the
vocabulary does not shrink with the tier), so they keep a small tier's memory close to a large one's.
`chunked_cross_entropy` takes the final hidden states and the head weight instead, and works through the tokens
a chunk at a time: each chunk's logits give its share of the loss and, at once, its gradient
(softmax - one-hot) / N, computed in place in the logits' own buffer, which is turned into the chunk's gradient
of the hidden states and added to the gradient of the head. Backward only scales what forward computed, in
place. The peak holds one chunk's fp32 logits (CHUNK_ELEMENTS, 32 MiB, whatever the vocabulary), and the step
does the same three matrix products per chunk as the unchunked loss does for the whole batch (no
recomputation). Loss and gradients equal `F.cross_entropy(h @ W.T, targets)`'s to within fp32 rounding (the
sums run in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 8M fp32 = 32 MiB (166 tokens at gpt2's 50,304 vocabulary)
MIN_CHUNK_TOKENS = 64  # below this the matrix products get too thin to run at full speed


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the loss for a vocabulary of `vocab_size`."""
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_size)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, n, chunk):
            h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
            logits = (h @ weight.T).float()
            # log-softmax by hand, in place: cross_entropy and softmax would each allocate another chunk
            logits -= logits.amax(dim=1, keepdim=True)
            picked = logits.gather(1, t[:, None])
            logits.exp_()
            norm = logits.sum(dim=1, keepdim=True)
            total += (norm.log() - picked).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            logits /= norm * n  # softmax / N ...
            logits[torch.arange(t.shape[0], device=t.device), t] -= 1.0 / n  # ... minus one-hot / N
            dlogits = logits.to(hidden.dtype)
            del logits
            if grad_hidden is not None:
                grad_hidden[lo:lo + chunk] = dlogits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(dlogits.T, h)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has = (grad_hidden is not None, grad_weight is not None)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        # in place: a copy would be another vocabulary x width buffer; the version counter makes a second
        # backward through the same graph an error rather than a wrong gradient
        saved = iter(ctx.saved_tensors)
        grad_hidden = next(saved).mul_(grad_loss) if ctx.has[0] else None
        grad_weight = next(saved).mul_(grad_loss) if ctx.has[1] else None
        return grad_hidden, grad_weight, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, `chunk` tokens at a time
    (default `chunk_tokens(vocabulary)`). hidden: (..., hidden_size); weight: (vocab, hidden_size); targets:
    (...) token ids."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if not torch.is_grad_enabled():  # evaluation: the loss alone
        total = sum(F.cross_entropy((hidden[lo:lo + chunk] @ weight.T).float(), targets[lo:lo + chunk],
                                    reduction="sum") for lo in range(0, hidden.shape[0], chunk))
        return total / hidden.shape[0]
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk)
