"""SLAO's math on known tensors: orthonormal re-initialisation, the λ schedule, the asymmetric merge."""

from __future__ import annotations

import math

import pytest
import torch

from training import slao
from training.errors import BackpropError


def adapter(seed: int, dtype: torch.dtype = torch.float32, r: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (m, n) in {"layers.0.q_proj": (16, 32), "layers.0.down_proj": (32, 24)}.items():
        state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, n, generator=g).to(dtype)
        state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(m, r, generator=g).to(dtype)
    return state


def test_lambda_is_one_over_the_square_root_of_the_run_index():
    assert [slao.merge_coefficient(i) for i in (1, 2, 3, 4, 9)] == pytest.approx(
        [1, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5, 1 / 3]
    )
    with pytest.raises(ValueError):
        slao.merge_coefficient(0)


def test_qr_initialisation_gives_orthonormal_rows_spanning_the_same_space():
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q = slao.orthonormal_rows(a)
    assert q.shape == a.shape
    assert torch.allclose(q @ q.T, torch.eye(8), atol=1e-5)
    r = q @ a.T  # Aᵀ = Qᵀᵀ R  =>  R = Q Aᵀ: upper triangular with a non-negative diagonal (the sign convention)
    assert torch.allclose(r, torch.triu(r), atol=1e-4) and (torch.diagonal(r) >= 0).all()
    assert torch.allclose(q.T @ r, a.T, atol=1e-4)  # same row space: A is rebuilt exactly


def test_the_b_merge_moves_lambda_of_the_way_to_the_new_b():
    b_merge, b_ft = torch.zeros(3, 2), torch.ones(3, 2)
    assert torch.equal(slao.merge_b(b_merge, b_ft, 4), torch.full((3, 2), 0.5))
    b_merge = torch.tensor([[2.0, -1.0]])
    b_ft = torch.tensor([[4.0, 3.0]])
    expected = b_merge + (b_ft - b_merge) / math.sqrt(3)
    assert torch.allclose(slao.merge_b(b_merge, b_ft, 3), expected)


def test_three_merges_follows_the_formula():
    ft1, ft2, ft3 = adapter(1), adapter(2), adapter(3)
    merged, stats1 = slao.merge(None, ft1, 1)
    assert all(torch.equal(merged[k], ft1[k]) for k in ft1) and stats1.lam == 1.0
    merged, stats2 = slao.merge(merged, ft2, 2)
    merged, stats3 = slao.merge(merged, ft3, 3)
    for key in ft1:
        if ".lora_A." in key:
            assert torch.equal(merged[key], ft3[key])  # A: the last run's own
        else:
            b2 = ft1[key] + (ft2[key] - ft1[key]) / math.sqrt(2)
            assert torch.allclose(merged[key], b2 + (ft3[key] - b2) / math.sqrt(3), atol=1e-6)
    assert stats3.lam == pytest.approx(1 / math.sqrt(3)) and stats3.b_norm_before == pytest.approx(stats2.b_norm_after)


def test_the_next_run_starts_from_orthonormal_a_and_the_previous_fine_tuned_b():
    previous = adapter(5)
    init = slao.next_run_init(previous)
    for a_key, b_key in slao.lora_pairs(previous).values():
        assert torch.allclose(init[a_key] @ init[a_key].T, torch.eye(4), atol=1e-5)
        assert torch.equal(init[b_key], previous[b_key])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters_are_handled_in_fp32(dtype):
    previous = adapter(7, dtype)
    init = slao.next_run_init(previous)
    reference = slao.next_run_init({k: v.float() for k, v in previous.items()})
    for key, value in init.items():
        assert value.dtype == dtype
        assert torch.allclose(value.float(), reference[key].to(dtype).float())
    merged, _ = slao.merge(previous, adapter(8, dtype), 2)
    assert all(v.dtype == dtype for v in merged.values())


def test_mismatched_adapters_are_a_coded_error():
    with pytest.raises(BackpropError) as error:
        slao.merge(adapter(1), adapter(2, r=8), 2)
    assert error.value.code == "INPUT_ADAPTER_MISMATCH" and "shape" in error.value.message
    with pytest.raises(BackpropError) as error:
        slao.merge(adapter(1), {k: v for k, v in adapter(2).items() if "q_proj" not in k}, 2)
    assert error.value.code == "INPUT_ADAPTER_MISMATCH"


def test_weights_fit_a_model_only_key_for_key_and_shape_for_shape():
    model = adapter(1)
    slao.check_fits(model, adapter(2), "init.safetensors")  # same layout, other values: fits
    cases = {
        "of another shape": adapter(2, r=8),
        "missing weights": {k: v for k, v in adapter(2).items() if "q_proj" not in k},
        "unexpected weights": {**adapter(2), "base_model.model.layers.0.v_proj.lora_A.weight": torch.zeros(4, 32)},
    }
    for found, weights in cases.items():
        with pytest.raises(BackpropError) as error:
            slao.check_fits(model, weights, "init.safetensors")
        assert error.value.code == "STATE_ADAPTER_MISMATCH" and found in error.value.message
        assert "init.safetensors" in error.value.message
