"""The OSoRA branch ΔW x = B (A x) (osora.functional): against dense references, and what autograd keeps for backward."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import get_peft_model
from torch import nn

import osora
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


def branch(x: torch.Tensor, f: dict, o_dim: str = "output") -> torch.Tensor:
    return OF.delta_forward(x, f["U"], f["Vh"], f["sigma"], f["S"], f["O"], o_dim)


@pytest.mark.parametrize("o_dim", ["output", "input"])
@pytest.mark.parametrize(
    ("dtype", "vec_dtype", "tol"),
    [
        (torch.float64, torch.float64, 1e-12),
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 3e-2),
        (torch.float16, torch.float32, 5e-3),
    ],
)
def test_gradients_match_dense_reference(o_dim, dtype, vec_dtype, tol) -> None:
    f = factors(dtype, vec_dtype, o_size=D_OUT if o_dim == "output" else D_IN)
    x = torch.randn(3, 7, D_IN, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, D_OUT, dtype=dtype)
    ref = grads(lambda x, f: dense_branch(x, f, o_dim), x, f, g)
    mine = grads(lambda x, f: branch(x, f, o_dim), x, f, g)
    assert branch(x, f, o_dim).dtype == dtype  # the factors' dtype
    for a, c in zip(mine, ref):
        torch.testing.assert_close(a, c, atol=tol * c.abs().max(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_parametrization_gradient_flows_to_s(dtype) -> None:
    f = factors(dtype, torch.float32)
    s = (1 + 0.3 * torch.randn(R)).requires_grad_()
    x = torch.randn(4, D_IN, dtype=dtype, requires_grad=True)
    g = torch.randn(4, D_OUT, dtype=dtype)
    y = branch(x, {**f, "S": OF.effective_S(s, f["sigma"], "scaled")})
    mine = [t.double() for t in torch.autograd.grad(y, (x, s, f["O"]), g)]
    y = dense_branch(x, f, S=f["sigma"].double() * s.double())
    ref = [t.double() for t in torch.autograd.grad(y, (x, s, f["O"]), g.double())]
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, c in zip(mine, ref):
        torch.testing.assert_close(a, c, atol=tol * c.abs().max(), rtol=0)


def test_autocast_matches_dense_reference() -> None:
    f = factors(torch.float32, torch.float32)
    x = torch.randn(3, 5, D_IN, requires_grad=True)
    g = torch.randn(3, 5, D_OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mine = grads(branch, x, f, g)
    for a, c in zip(mine, grads(lambda x, f: dense_branch(x, f), x, f, g)):
        torch.testing.assert_close(a, c, atol=3e-2 * c.abs().max(), rtol=0)


@pytest.mark.parametrize("wrt", [("S",), ("O",), ("S", "O"), ("x",)])
def test_only_needed_gradients(wrt) -> None:
    f = factors(torch.float64, torch.float64)
    for k in ("S", "O"):
        f[k].requires_grad_(k in wrt)
    x = torch.randn(5, D_IN, dtype=torch.float64, requires_grad="x" in wrt)
    g = torch.randn(5, D_OUT, dtype=torch.float64)
    for a, b in zip(grads(branch, x, f, g, wrt), grads(lambda x, f: dense_branch(x, f), x, f, g, wrt)):
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
    torch.testing.assert_close(OF.delta_weight(U, Vh, sigma, S, O, o_dim).double(), dense, atol=1e-6, rtol=0)


@pytest.mark.parametrize("o_dim", ["output", "input"])
def test_exactly_zero_at_init(o_dim: str) -> None:
    f = factors(torch.bfloat16, torch.float32, o_size=D_OUT if o_dim == "output" else D_IN)
    with torch.no_grad():
        f["S"].copy_(f["sigma"])
        f["O"].fill_(1.0)
    x = torch.randn(3, D_IN, dtype=torch.bfloat16, requires_grad=True)
    y = branch(x, f, o_dim)
    (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("o_dim", ["output", "input"])
def test_saves_no_per_token_tensor_wider_than_r(o_dim: str, dtype: torch.dtype) -> None:
    """Autograd keeps z (tokens × r) for backward, never a d_in- or d_out-wide per-token tensor; with O on the
    input side ∂L/∂O needs x, and what is kept is x itself (the layer's input, no copy)."""
    f = factors(dtype, torch.float32, o_size=D_OUT if o_dim == "output" else D_IN)
    x = torch.randn(3, 13, D_IN, dtype=dtype).requires_grad_()  # 39 tokens: no factor has a dimension of 39
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = branch(x, f, o_dim)
    per_token = [t for t in saved if t.dim() >= 2 and (tuple(t.shape[:-1]) == (3, 13) or t.shape[0] == 39)]
    wide = [tuple(t.shape) for t in per_token if t.shape[-1] > R]
    if o_dim == "output":
        assert wide == []
        assert [(t.numel(), t.shape[-1]) for t in per_token] == [(39 * R, R)]  # z = Vᵀx, r per token
    else:
        assert [w[-1] for w in wide] == [D_IN]
        assert all(t.data_ptr() == x.data_ptr() for t in per_token)
    y.sum().backward()


@pytest.mark.parametrize("o_dim", ["output", "input"])
def test_double_backward(o_dim: str) -> None:
    f = factors(torch.float64, torch.float64, o_size=D_OUT if o_dim == "output" else D_IN)
    x = torch.randn(4, D_IN, dtype=torch.float64, requires_grad=True)

    def grad_norm(fn) -> torch.Tensor:
        (dS,) = torch.autograd.grad(fn(x, f).pow(2).sum(), f["S"], create_graph=True)
        return torch.autograd.grad(dS.pow(2).sum(), x)[0]

    mine = grad_norm(lambda x, f: branch(x, f, o_dim))
    torch.testing.assert_close(mine, grad_norm(lambda x, f: dense_branch(x, f, o_dim)))


def test_forward_mode_ad() -> None:
    import torch.autograd.forward_ad as fwAD

    f = factors(torch.float64, torch.float64)
    x, t = torch.randn(4, D_IN, dtype=torch.float64), torch.randn(4, D_IN, dtype=torch.float64)
    with fwAD.dual_level():
        jvp = fwAD.unpack_dual(branch(fwAD.make_dual(x, t), f)).tangent
    torch.testing.assert_close(jvp, dense_branch(t, f).detach())


def test_torch_func_per_example_gradients() -> None:
    """torch.func.vmap(grad) gives per-example ∂L/∂S, as the dense reference does."""
    f = factors(torch.float64, torch.float64)
    x = torch.randn(5, D_IN, dtype=torch.float64)

    def loss(S: torch.Tensor, xi: torch.Tensor, fn) -> torch.Tensor:
        return fn(xi.unsqueeze(0), {**f, "S": S}).pow(2).sum()

    S = f["S"].detach()
    mine = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(S, x, branch)
    ref = torch.stack([torch.func.grad(loss)(S, xi, lambda x, f: dense_branch(x, f)) for xi in x])
    torch.testing.assert_close(mine, ref)


# -- in a model ---------------------------------------------------------------------------------------------------


def train_grads(model: nn.Module, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def osora_model(**config) -> nn.Module:
    return get_peft_model(tiny_model("llama"), osora.OSoRAConfig(r=4, init_weights=False, **config))


@pytest.mark.parametrize("o_dim", ["output", "input"])
def test_layer_forward_is_the_merged_delta(o_dim: str) -> None:
    """One ΔW: the layer's branch equals x (get_delta_weight)ᵀ, the ΔW merge and export add to the weight."""
    layer = next(m for m in osora_model(o_dim=o_dim).modules() if isinstance(m, OSoRALayer))
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64)
    layer.double()
    delta = layer.get_delta_weight("default")  # (d_out, d_in), formed in float32
    torch.testing.assert_close(layer.osora_branch("default", x), x @ delta.T, atol=1e-6, rtol=1e-5)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)


def test_dropout_applies_to_the_branch_input() -> None:
    model, ids = osora_model(dropout=0.3), tiny_inputs()
    model.train()
    torch.manual_seed(5)
    first = train_grads(model, ids)
    torch.manual_seed(5)
    again = train_grads(model, ids)
    torch.manual_seed(6)
    other = train_grads(model, ids)
    name = next(iter(first))
    assert len(first) == 2 * 14
    assert not torch.allclose(other[name], first[name])  # dropout is active
    for name in first:
        torch.testing.assert_close(again[name], first[name])


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
    compiled = torch.compile(branch, backend="aot_eager", fullgraph=True)
    for a, b in zip(grads(compiled, x, f, g), grads(branch, x, f, g)):
        torch.testing.assert_close(a, b)


def test_torch_compile_aot_eager_matches_eager() -> None:
    """Dynamo and AOTAutograd trace the branch (no code generation: fast on CPU)."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager() -> None:
    start = time.perf_counter()
    compiled_matches_eager("inductor")
    print(f"inductor compile + run: {time.perf_counter() - start:.1f} s")
