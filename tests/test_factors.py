"""The one path to the factors: batched equals single, one batched computation per shape at injection."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import osora
from osora import factors as factors_module
from osora.svd import SVDSpec, batched_top_r_svd, top_r_svd

from conftest import tiny_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def power_law_stack(batch: int, m: int, n: int, alpha: float = 0.35, seed: int = 0) -> torch.Tensor:
    """``batch`` matrices U diag(i^-α) Vᵀ with random orthonormal U, V (α = 0.35: a slowly decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(batch, m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(batch, n, k, generator=g)).Q
    return (U * torch.arange(1, k + 1) ** -alpha) @ V.mT


@pytest.mark.parametrize("shape", [(200, 320), (320, 200)])
@pytest.mark.parametrize("method", ["randomized", "exact"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_equals_single(
    shape: tuple[int, int], method: str, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each matrix's factors are those of the matrix alone, bit for bit, although the matrices of the batch stop
    iterating at different steps and, with 2 threads, are split between threads (compact adapters recompute
    factors on load, possibly in another batch, on a machine with another thread count)."""
    W = power_law_stack(5, *shape)
    # a steep decay: at r = 8 its σ_r is too small for the bfloat16 products, and it goes on alone in float32
    # (more Krylov steps than the others; with a float32 sketch, fewer)
    W[1] = power_law_stack(1, *shape, alpha=1.5, seed=1)[0]
    spec = SVDSpec(method=method, oversample=8, power_iters=0)  # type: ignore[arg-type]
    # matrices this small take the exact SVD under the randomized method's fixed per-matrix cost
    monkeypatch.setattr(osora.svd, "RANDOMIZED_FIXED_COST", 0)
    torch.set_num_threads(threads)
    try:
        batched = batched_top_r_svd(W, 8, spec)
        assert torch.get_num_threads() == threads  # restored after the single-threaded kernels
        # alone at the same thread count: a matrix this small runs single-threaded kernels alone too
        singles = [top_r_svd(w, 8, spec) for w in W]
        # and the same matrices stored transposed (Conv1D weights)
        views = [top_r_svd(w.T.contiguous().T, 8, spec) for w in W]
    finally:
        torch.set_num_threads(1)
    iterations = {f.accuracy.power_iters for f in batched if f.accuracy is not None}
    if method == "randomized":
        assert len(iterations) > 1, "the test needs matrices that stop at different Krylov steps"
    for i, (f, single, view) in enumerate(zip(batched, singles, views)):
        for a, b, c in zip(
            (f.U, f.sigma, f.Vh), (single.U, single.sigma, single.Vh), (view.U, view.sigma, view.Vh)
        ):
            assert torch.equal(a, b) and torch.equal(a, c), i
        assert f.accuracy == single.accuracy
        # and they are the top-8 factors, against a float64 reference written here
        U, s, Vh = torch.linalg.svd(W[i].double(), full_matrices=False)
        assert float(((f.sigma.double() - s[:8]).abs() / s[:8]).max()) <= 1e-3
        assert float((U[:, :8].T @ f.U.double()).square().sum() / 8) >= 0.99
        torch.testing.assert_close(f.U.T @ f.U, torch.eye(8), atol=1e-5, rtol=0)


def test_injection_decomposes_each_shape_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, tuple[int, ...]]] = []
    real = factors_module.batched_top_r_svd

    def counting(W: list[torch.Tensor], r: int, spec: SVDSpec) -> object:
        calls.append((r, (len(W), *W[0].shape)))
        return real(W, r, spec)

    monkeypatch.setattr(factors_module, "batched_top_r_svd", counting)
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4))
    layers = [m for m in model.modules() if isinstance(m, osora.OSoRALayer)]
    shapes = {tuple(m.dense_base_weight().shape) for m in layers}
    assert len(calls) == len(shapes) < len(layers)  # one stack per shape, not one SVD per layer
    assert sum(c[1][0] for c in calls) == len(layers)
    # each layer holds the factors of its own weight
    for m in layers:
        W = m.dense_base_weight().double()
        U, s, Vh = (
            m.osora_U["default"].double(),
            m.osora_sigma["default"].double(),
            m.osora_Vh["default"].double(),
        )
        torch.testing.assert_close(U.T @ W @ Vh.T, torch.diag(s), atol=1e-4, rtol=0)
    # a second adapter of equal r and spec shares the factors: nothing is decomposed again
    calls.clear()
    model.add_adapter("other", osora.OSoRAConfig(r=4))
    assert calls == []
    model.add_adapter("third", osora.OSoRAConfig(r=4, svd_seed=1, init_method="exact"))
    assert len(calls) == len(shapes)


def test_injection_matches_per_layer_factors() -> None:
    """Factors computed in one batch at injection equal those a layer computes alone (add_adapter on one layer)."""
    model = get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, svd_oversample=2))
    model.add_adapter(
        "one", osora.OSoRAConfig(r=4, svd_oversample=2, svd_seed=0, target_modules=["layers.1.mlp.up_proj"])
    )
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    assert torch.equal(layer.osora_U["default"], layer.osora_U["one"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_name(bad: float) -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj .* 1 NaN or infinite entries"):
        get_peft_model(model, osora.OSoRAConfig(r=4, target_modules=["q_proj"]))
