"""The memory-lean backward of osora.autograd against dense references and autograd's plain path."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn

import osora
from osora import autograd as OA
from osora import functional as OF
from osora.layer import OSoRALayer

from conftest import tiny_inputs, tiny_model

D_OUT, D_IN, R = 24, 20, 6


def factors(dtype: torch.dtype, vec_dtype: torch.dtype, o_size: int = D_OUT, seed: int = 0) -> dict:
    """Orthonormal U, Vᵀ, σ in ``dtype``; non-identity S, O in ``vec_dtype`` (leaf tensors requiring grad)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D_OUT, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D_IN, R, generator=g, dtype=torch.float64))[0]
    sigma = torch.rand(R, generator=g, dtype=torch.float64) + 0.5
    S = sigma * (1 + 0.3 * torch.randn(R, generator=g, dtype=torch.float64))
    O = 1 + 0.3 * torch.randn(o_size, generator=g, dtype=torch.float64)
    return {
        "U": U.to(dtype),
        "Vh": V.T.contiguous().to(dtype),
        "sigma": sigma.to(dtype),
        "S": S.to(vec_dtype).requires_grad_(),
        "O": O.to(vec_dtype).requires_grad_(),
    }


def dense_branch(
    x: torch.Tensor, f: dict, o_dim: str = "output", S: torch.Tensor | None = None
) -> torch.Tensor:
    """(diag(O) U diag(S) Vᵀ − U diag(σ) Vᵀ) x (output) or (U diag(S) Vᵀ diag(O) − U diag(σ) Vᵀ) x, float64."""
    U, Vh, sigma = (f[k].double() for k in ("U", "Vh", "sigma"))
    S = (f["S"] if S is None else S).double()
    O = f["O"].double()
    new = (
        torch.diag(O) @ U @ torch.diag(S) @ Vh
        if o_dim == "output"
        else U @ torch.diag(S) @ Vh @ torch.diag(O)
    )
    return x.double() @ (new - U @ torch.diag(sigma) @ Vh).T


def grads(fn, x: torch.Tensor, f: dict, g: torch.Tensor, wrt: tuple[str, ...] = ("x", "S", "O")) -> tuple:
    """The branch output of ``fn`` and its gradients against the cotangent g, as float64."""
    inputs = {"x": x, "S": f["S"], "O": f["O"]}
    y = fn(x, f)
    out = torch.autograd.grad(y, [inputs[k] for k in wrt], g.to(y.dtype))
    return (y.detach().double(), *(t.double() for t in out))


def custom(x: torch.Tensor, f: dict, o_dim: str = "output") -> torch.Tensor:
    return OA.delta_forward(x, f["U"], f["Vh"], f["sigma"], f["S"], f["O"], o_dim)


def plain(x: torch.Tensor, f: dict, o_dim: str = "output") -> torch.Tensor:
    return OF.delta_forward(x, f["U"], f["Vh"], f["sigma"], f["S"], f["O"], o_dim)


@pytest.mark.parametrize(
    ("dtype", "vec_dtype", "tol"),
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 3e-2),
        (torch.float16, torch.float32, 5e-3),
    ],
)
def test_gradients_match_dense_reference_and_plain_path(dtype, vec_dtype, tol) -> None:
    f = factors(dtype, vec_dtype)
    x = torch.randn(3, 7, D_IN, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, D_OUT, dtype=dtype)
    ref = grads(lambda x, f: dense_branch(x, f), x, f, g)
    mine = grads(custom, x, f, g)
    theirs = grads(plain, x, f, g)
    assert mine[0].dtype == theirs[0].dtype
    for a, b, c in zip(mine, theirs, ref):
        scale = c.abs().max()
        torch.testing.assert_close(a, c, atol=tol * scale, rtol=0)
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_parametrization_gradient_flows_to_s(dtype) -> None:
    f = factors(dtype, torch.float32)
    s = (1 + 0.3 * torch.randn(R)).requires_grad_()
    x = torch.randn(4, D_IN, dtype=dtype, requires_grad=True)
    g = torch.randn(4, D_OUT, dtype=dtype)

    def run(fn):
        S = OF.effective_S(s, f["sigma"], "scaled")
        y = fn(x, {**f, "S": S})
        return [t.double() for t in torch.autograd.grad(y, (x, s, f["O"]), g)]

    y = dense_branch(x, f, S=f["sigma"].double() * s.double())
    ref = [t.double() for t in torch.autograd.grad(y, (x, s, f["O"]), g.double())]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b, c in zip(run(custom), run(plain), ref):
        torch.testing.assert_close(a, c, atol=tol * c.abs().max(), rtol=0)
        torch.testing.assert_close(a, b, atol=tol * c.abs().max(), rtol=0)


def test_autocast_matches_plain_path() -> None:
    f = factors(torch.float32, torch.float32)
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    g = torch.randn(3, 5, D_OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine, theirs = grads(custom, x, f, g), grads(plain, x, f, g)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=3e-2 * b.abs().max(), rtol=0)


@pytest.mark.parametrize("wrt", [("S",), ("O",), ("S", "O"), ("x",)])
def test_only_needed_gradients(wrt) -> None:
    f = factors(torch.float64, torch.float64)
    for k in ("S", "O"):
        f[k].requires_grad_(k in wrt)
    x = torch.randn(5, D_IN, dtype=torch.float64, requires_grad="x" in wrt)
    g = torch.randn(5, D_OUT, dtype=torch.float64)
    for a, b in zip(grads(custom, x, f, g, wrt), grads(lambda x, f: dense_branch(x, f), x, f, g, wrt)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("o_dim", ["output", "input"])
def test_low_rank_factors_multiply_to_the_dense_delta(o_dim: str) -> None:
    f = factors(torch.float64, torch.float64)
    U, Vh, sigma, S = f["U"], f["Vh"], f["sigma"], f["S"]
    O = f["O"] if o_dim == "output" else 1.0 + 0.3 * torch.randn(Vh.shape[1], dtype=torch.float64)
    dense = (
        torch.diag(O) @ U @ torch.diag(S) @ Vh
        if o_dim == "output"
        else U @ torch.diag(S) @ Vh @ torch.diag(O)
    ) - U @ torch.diag(sigma) @ Vh
    B, A = OF.low_rank_factors(U, Vh, sigma, S, O, o_dim)
    torch.testing.assert_close(B @ A, dense, atol=1e-12, rtol=0)


def test_exactly_zero_at_init() -> None:
    f = factors(torch.bfloat16, torch.float32)
    with torch.no_grad():
        f["S"].copy_(f["sigma"])
        f["O"].fill_(1.0)
    x = torch.randn(3, D_IN, dtype=torch.bfloat16, requires_grad=True)
    y = custom(x, f)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))


def test_saves_no_per_token_wide_tensor() -> None:
    """The backward keeps z (tokens × r) and references to the factors, never x or a d_out-wide activation."""
    f = factors(torch.float32, torch.float32)
    tokens = 3 * 11
    x = torch.randn(3, 11, D_IN).requires_grad_()
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = OA.OSoRABranch.apply(x, f["U"], f["Vh"], f["sigma"], f["S"], f["O"])
    per_token = [s for s in saved if s.numel() >= tokens * min(D_IN, D_OUT)]
    assert per_token == [], per_token
    assert torch.Size([3, 11, R]) in saved
    y.sum().backward()


def test_input_side_O_uses_plain_path() -> None:
    f = factors(torch.float64, torch.float64, o_size=D_IN)
    x = torch.randn(2, 3, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, D_OUT, dtype=torch.float64)
    mine = grads(lambda x, f: custom(x, f, "input"), x, f, g)
    ref = grads(lambda x, f: dense_branch(x, f, "input"), x, f, g)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b)


def test_double_backward_needs_plain_path() -> None:
    f = factors(torch.float64, torch.float64)
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)

    def grad_norm(fn) -> torch.Tensor:
        (dS,) = torch.autograd.grad(fn(x, f).pow(2).sum(), f["S"], create_graph=True)
        return torch.autograd.grad(dS.pow(2).sum(), x)[0]

    with pytest.raises(RuntimeError, match="not twice differentiable"):
        grad_norm(custom)
    with OA.plain_path():
        mine = grad_norm(custom)
    torch.testing.assert_close(mine, grad_norm(lambda x, f: dense_branch(x, f)))


def test_forward_mode_ad_uses_plain_path() -> None:
    import torch.autograd.forward_ad as fwAD

    f = factors(torch.float64, torch.float64)
    x, t = torch.randn(4, D_IN, dtype=torch.float64), torch.randn(4, D_IN, dtype=torch.float64)
    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(custom(fwAD.make_dual(x, t), f)).tangent
    torch.testing.assert_close(jvp, dense_branch(t, f).detach())


# -- in a model ---------------------------------------------------------------------------------------------------


def train_grads(model: nn.Module, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def osora_model(**config) -> nn.Module:
    return get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False, **config))


@pytest.mark.parametrize("s_parametrization", ["raw", "scaled"])
def test_model_gradients_match_plain_path(s_parametrization) -> None:
    model, ids = osora_model(s_parametrization=s_parametrization), tiny_inputs()
    mine = train_grads(model, ids)
    with OA.plain_path():
        ref = train_grads(model, ids)
    assert len(mine) == 2 * 14
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-6, rtol=1e-4)


def test_dropout_matches_plain_path() -> None:
    model, ids = osora_model(dropout=0.3), tiny_inputs()
    model.train()
    torch.manual_seed(5)
    mine = train_grads(model, ids)
    torch.manual_seed(5)
    with OA.plain_path():
        ref = train_grads(model, ids)
    torch.manual_seed(6)
    other = train_grads(model, ids)
    name = next(iter(ref))
    assert not torch.allclose(other[name], ref[name])  # dropout is active
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_and_trains(use_reentrant) -> None:
    model, ids = osora_model(), tiny_inputs()
    model.train()  # dropout is 0 in the tiny config, so train mode is deterministic
    ref = train_grads(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    assert model.base_model.model.model.gradient_checkpointing
    mine = train_grads(model, ids)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-6, rtol=1e-4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def compiled_matches_eager(backend: str) -> None:
    model, ids = osora_model(), tiny_inputs()
    ref_loss = model(input_ids=ids, labels=ids).loss
    ref = train_grads(model, ids)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend=backend, fullgraph=False)
    torch._dynamo.reset()
    loss = compiled(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    mine = train_grads(compiled, ids)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-5, rtol=1e-4)


def test_branch_compiles_without_graph_break() -> None:
    f = factors(torch.float32, torch.float32)
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    g = torch.randn(3, 5, D_OUT)
    torch._dynamo.reset()
    compiled = torch.compile(custom, backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(compiled, x, f, g), grads(custom, x, f, g)):
        torch.testing.assert_close(a, b)


def test_torch_compile_aot_eager_matches_eager() -> None:
    """Dynamo and AOTAutograd trace the custom Function (no code generation: fast on CPU)."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    start = time.perf_counter()
    compiled_matches_eager("inductor")
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")


def graph_nodes(y: torch.Tensor) -> set[str]:
    seen, stack = set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and type(fn).__name__ not in seen:
            seen.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
    return seen


def test_layer_uses_custom_path_unless_plain() -> None:
    layer = next(m for m in osora_model().modules() if isinstance(m, OSoRALayer))
    x = torch.randn(2, 3, layer.in_features)
    assert "OSoRABranchBackward" in graph_nodes(layer(x))
    with OA.plain_path():
        assert "OSoRABranchBackward" not in graph_nodes(layer(x))
