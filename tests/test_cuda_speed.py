"""Speed and memory features for CUDA, exercised on CPU where their logic allows: the optimizer, gradient checkpointing."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def _params(seed: int = 0) -> list:
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]


def _train(optimizer, params, steps: int) -> None:
    for i in range(steps):
        optimizer.zero_grad()
        sum(((p - i) ** 2).sum() for p in params).backward()
        optimizer.step()


@pytest.mark.parametrize("saved_fused", [True, False])
def test_an_optimizer_state_saved_fused_or_not_resumes_into_this_machines_optimizer(saved_fused):
    """A checkpoint from a CUDA machine (fused AdamW) resumes on a CPU one and the other way: same steps as never stopped."""
    from training.trainer import adamw, fit_optimizer_state

    params = _params()
    assert adamw(params, 1e-2, 0.01).param_groups[0]["fused"] is None  # CPU parameters: torch's default, not fused
    saved = adamw(params, 1e-2, 0.01, fused=saved_fused)
    _train(saved, params, 3)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]

    resumed = adamw(resumed_params, 1e-2, 0.01, fused=not saved_fused)
    resumed.load_state_dict(copy.deepcopy(saved.state_dict()))
    fit_optimizer_state(resumed)
    assert resumed.param_groups[0]["fused"] is None  # on CPU, whatever the checkpoint's machine did
    _train(saved, params, 2)
    _train(resumed, resumed_params, 2)
    for a, b in zip(params, resumed_params, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
