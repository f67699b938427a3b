"""SLAO: single-LoRA continual learning with asymmetric merging, as pure tensor functions.

From "Merge before Forget: Single LoRA Continual Learning via Asymmetric Merging" (Qiao & Mahdavi,
arXiv 2512.23017). For every LoRA module, ΔW = B·A with A ∈ R^{r×n}, B ∈ R^{m×r}, over runs i = 1..T:

    run 1         ordinary LoRA init; after it:  A_merge = A_ft,1   B_merge = B_ft,1
    before i ≥ 2  A_ft,i−1ᵀ = Q R (signs fixed so diag(R) ≥ 0);  A_init = Qᵀ (orthonormal rows);
                  B_init = B_ft,i−1 (the previous run's fine-tuned B, not the merged one)
    after i ≥ 2   A_merge = A_ft,i;   B_merge = B_merge + λ(i)·(B_ft,i − B_merge),   λ(i) = 1/√i

The math runs in fp32 (QR in half precision is unstable) and results are cast back to each tensor's dtype.
Adapters are peft state dicts: `...<module>.lora_A.weight` and `...<module>.lora_B.weight` pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.errors import BackpropError

if TYPE_CHECKING:
    import torch

    StateDict = dict[str, torch.Tensor]


def merge_coefficient(i: int) -> float:
    """λ(i) = 1/√i for run i ≥ 1 (run 1 takes its own weights: λ = 1)."""
    if i < 1:
        raise ValueError(f"runs are numbered from 1, got {i}")
    return 1.0 / math.sqrt(i)


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """A_init = Qᵀ from the QR decomposition of Aᵀ, signs fixed so that diag(R) ≥ 0 (a unique Q)."""
    import torch

    q, r = torch.linalg.qr(a.detach().float().T, mode="reduced")  # Aᵀ (n×r) = Q (n×r) R (r×r)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).T.contiguous().to(a.dtype)


def merge_b(b_merge: torch.Tensor, b_ft: torch.Tensor, i: int) -> torch.Tensor:
    """B_merge + λ(i)·(B_ft,i − B_merge), in fp32, returned in B_merge's dtype."""
    lam = merge_coefficient(i)
    merged = b_merge.detach().float() + lam * (b_ft.detach().float() - b_merge.detach().float())
    return merged.to(b_merge.dtype)


def lora_pairs(state: StateDict) -> dict[str, tuple[str, str]]:
    """{module: (A key, B key)} for every LoRA module in a peft state dict."""
    pairs: dict[str, tuple[str, str]] = {}
    for key in state:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key not in state:
                raise BackpropError("INPUT_ADAPTER_MISMATCH", reason=f"{key} has no matching lora_B")
            pairs[module] = (key, b_key)
    if not pairs:
        raise BackpropError("INPUT_ADAPTER_MISMATCH", reason="no LoRA weights (lora_A/lora_B) in the adapter")
    return pairs


def check_compatible(a: StateDict, b: StateDict) -> None:
    """Two adapters can be merged only if they have the same LoRA modules with the same shapes."""
    if set(a) != set(b):
        extra = sorted(set(a) ^ set(b))[:3]
        raise BackpropError("INPUT_ADAPTER_MISMATCH", reason=f"different LoRA modules, e.g. {', '.join(extra)}")
    for key in a:
        if a[key].shape != b[key].shape:
            raise BackpropError("INPUT_ADAPTER_MISMATCH",
                                reason=f"{key}: shape {tuple(a[key].shape)} vs {tuple(b[key].shape)}")  # fmt: skip


def check_fits(expected: StateDict, weights: StateDict, path: object) -> None:
    """LoRA weights fit a model only with exactly its adapter's keys, shape for shape (peft would skip the rest)."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    reshaped = [k for k in sorted(set(expected) & set(weights)) if tuple(expected[k].shape) != tuple(weights[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weights, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights, e.g. {unexpected[0]}")
    if reshaped:
        k = reshaped[0]
        shapes = f"{tuple(weights[k].shape)}, the model has {tuple(expected[k].shape)}"
        problems.append(f"{len(reshaped)} of another shape, e.g. {k}: {shapes}")
    if problems:
        raise BackpropError("STATE_ADAPTER_MISMATCH", path=path, reason="; ".join(problems))


def next_run_init(previous_ft: StateDict) -> StateDict:
    """The initialisation of run i ≥ 2 from run i−1's fine-tuned adapter: A = orthonormal rows, B = B_ft,i−1."""
    init = dict(previous_ft)
    for a_key, b_key in lora_pairs(previous_ft).values():
        init[a_key] = orthonormal_rows(previous_ft[a_key])
        init[b_key] = previous_ft[b_key].detach().clone()
    return init


@dataclass
class MergeStats:
    run: int
    lam: float
    a_norm_before: float  # ‖A_merge‖ before this merge (Frobenius, summed in quadrature over modules)
    a_norm_after: float
    b_norm_before: float
    b_norm_after: float


def merge(merged: StateDict | None, fine_tuned: StateDict, i: int) -> tuple[StateDict, MergeStats]:
    """The merged adapter after run i: A from the run itself, B moved λ(i) of the way towards the run's B."""
    if merged is None or i == 1:
        result = {k: v.detach().clone() for k, v in fine_tuned.items()}
        norm_a, norm_b = _norms(result)
        return result, MergeStats(i, 1.0, 0.0, norm_a, 0.0, norm_b)
    check_compatible(merged, fine_tuned)
    before_a, before_b = _norms(merged)
    result = dict(merged)
    for a_key, b_key in lora_pairs(fine_tuned).values():
        result[a_key] = fine_tuned[a_key].detach().clone()
        result[b_key] = merge_b(merged[b_key], fine_tuned[b_key], i)
    after_a, after_b = _norms(result)
    return result, MergeStats(i, merge_coefficient(i), before_a, after_a, before_b, after_b)


def _norms(state: StateDict) -> tuple[float, float]:
    a = b = 0.0
    for a_key, b_key in lora_pairs(state).values():
        a += float(state[a_key].float().pow(2).sum())
        b += float(state[b_key].float().pow(2).sum())
    return math.sqrt(a), math.sqrt(b)
