"""Cross-entropy through the output head without holding every target position's logits at once.

With a 152k-token vocabulary, 16k target tokens are ~10 GB of float32 logits, and as much again for their
gradient. The output head is frozen under LoRA, so the only gradient the loss must hand back is the one for
the hidden states, (softmax - onehot) @ W. `ChunkedCrossEntropy` computes it in forward, a chunk of rows at a
time, and keeps only that ([rows, hidden], the size of the hidden states themselves): at most one chunk of
logits ever exists. On CUDA with liger-kernel installed, its fused linear cross-entropy (Triton) does the same.

A head whose weight is trained (rows for new tokens) or that is not a plain linear layer takes the plain path:
full logits, autograd does the rest.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

CHUNK_ROWS = 4096  # 4096 x 152k float32 logits: 2.5 GB at a time instead of all of them
KERNELS = ("auto", "liger", "chunked", "plain")


def loss_kernel(head: Any, device: str, setting: str = "auto") -> str:
    """Which computation `head_loss` uses: "liger", "chunked" or "plain".

    auto: liger on CUDA when it imports, else chunked; a trainable or non-linear head is always plain."""
    if setting == "plain" or not _frozen_linear(head):
        return "plain"
    if setting in ("auto", "liger") and device == "cuda" and _liger_loss() is not None:
        return "liger"
    return "chunked"


def head_loss(hidden: Any, head: Any, labels: Any, kernel: str, chunk_rows: int | None = None) -> Any:
    """Summed cross-entropy of `head(hidden)` against `labels` ([rows, hidden], [rows]; every label counts)."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    if kernel == "plain":
        return F.cross_entropy(head(hidden).float(), labels, reduction="sum")
    if kernel == "liger":
        result = _liger_loss()(head.weight, hidden, labels, head.bias)
        return result[0] if isinstance(result, tuple) else getattr(result, "loss", result)
    if torch.is_grad_enabled() and hidden.requires_grad:
        return ChunkedCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_rows)
    return _chunked(hidden, head.weight, head.bias, labels, chunk_rows, None)


def head_token_losses(hidden: Any, head: Any, labels: Any, kernel: str, chunk_rows: int | None = None) -> Any:
    """Cross-entropy of each row of `head(hidden)` against its label ([rows]): what a preference loss weighs per answer.

    "liger" has no per-row result: it takes the chunked path, which gives the same numbers."""
    chunk_rows = chunk_rows or CHUNK_ROWS
    if kernel == "plain":
        return F.cross_entropy(head(hidden).float(), labels, reduction="none")
    if torch.is_grad_enabled() and hidden.requires_grad:
        return ChunkedTokenCrossEntropy.apply(hidden, head.weight, head.bias, labels, chunk_rows)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    _chunked(hidden, head.weight, head.bias, labels, chunk_rows, None, losses)
    return losses


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of hidden @ W.T (+ b), chunk by chunk; the hidden states' gradient is computed in forward.

    W and b must be frozen: no gradient is returned for them."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, labels: Any, chunk_rows: int) -> Any:
        grad = torch.empty_like(hidden)
        total = _chunked(hidden, weight, bias, labels, chunk_rows, grad)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


class ChunkedTokenCrossEntropy(torch.autograd.Function):
    """As ChunkedCrossEntropy, one loss a row: a row's loss depends on its hidden state alone, so the gradient of row i
    is its own (softmax - onehot) @ W times the weight the caller gives loss i."""

    @staticmethod
    def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, labels: Any, chunk_rows: int) -> Any:
        grad = torch.empty_like(hidden)
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        _chunked(hidden, weight, bias, labels, chunk_rows, grad, losses)
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype)[:, None], None, None, None, None


def _chunked(
    hidden: Any, weight: Any, bias: Any, labels: Any, chunk_rows: int, grad: Any | None, losses: Any | None = None
) -> Any:
    """The summed loss; with `grad`, also fill it with d loss / d hidden (per row); with `losses`, each row's loss."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        target = labels[rows]
        # Logits in the head's dtype (what a bf16 matmul gives), the softmax in float32 (as the plain path's .float()).
        logits = F.linear(hidden[rows], weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        row_losses = lse - logits.gather(1, target[:, None]).squeeze(1)
        total += row_losses.sum()
        if losses is not None:
            losses[rows] = row_losses
        if grad is not None:
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(target.shape[0], device=target.device), target] -= 1.0
            grad[rows] = probs.to(weight.dtype) @ weight
        del logits
    return total


def _frozen_linear(head: Any) -> bool:
    if type(head) is not torch.nn.Linear:  # peft wrappers (trained token rows) and custom heads: plain path
        return False
    return not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)


def _liger_loss() -> Any:
    """liger-kernel's fused linear cross-entropy (reduction sum), or None when it does not import."""
    global _LIGER
    if _LIGER is None:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import (  # type: ignore[import-not-found]
                LigerFusedLinearCrossEntropyLoss,
            )

            _LIGER = LigerFusedLinearCrossEntropyLoss(reduction="sum")
        except Exception:  # not installed, or no Triton for this machine
            _LIGER = False
    return _LIGER or None


_LIGER: Any = None
