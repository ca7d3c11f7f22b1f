"""ButterflyMoE layer and baselines against explicit dense reconstructions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bmoe_runtime.nn.moe import VARIANTS, ButterflyExperts, ButterflyMoE, IndependentExperts, balance_loss, make_experts
from bmoe_runtime.nn.ternary import quantize

FORMS = ["paper", "ffn"]


def make_layer(variant: str, form: str, d: int = 48, f: int = 96, n: int = 4, k: int = 2, seed: int = 0) -> ButterflyMoE:
    torch.manual_seed(seed)
    layer = ButterflyMoE(d, f, n, k, variant, form)
    with torch.no_grad():  # trained-looking angles (far from identity) so the rotations matter
        for name, p in layer.named_parameters():
            if name.endswith("angles"):
                p.normal_(0, 0.7)
    return layer


def banks(layer: ButterflyMoE) -> list[torch.nn.Module]:
    return [layer.experts] if layer.expert_form == "paper" else [layer.up, layer.down]


def reference_routing(layer: ButterflyMoE, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing recomputed in numpy float64 from the gate's weights: (gates [T, k], experts [T, k])."""
    logits = x.detach().double().numpy() @ layer.router.gate.weight.detach().double().numpy().T
    k = layer.router.top_k
    experts = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # largest logits first
    chosen = np.take_along_axis(logits, experts, axis=1)
    e = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True), experts  # softmax over the k chosen logits only


def reference_forward(layer: ButterflyMoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop in float64 over independently recomputed routing and each bank's dense expert_matrix."""
    with torch.no_grad():
        gates, index = reference_routing(layer, x)
        n = layer.router.n_experts
        if layer.expert_form == "paper":
            mats = [layer.experts.expert_matrix(i).double() for i in range(n)]
            w_out = layer.proj.weight.double()
        else:
            ups = [layer.up.expert_matrix(i).double() for i in range(n)]
            downs = [layer.down.expert_matrix(i).double() for i in range(n)]
        out = torch.zeros(x.shape[0], layer.d_model, dtype=torch.float64)
        for t in range(x.shape[0]):
            xt = x[t].double()
            if layer.expert_form == "paper":
                h = sum(float(gates[t, j]) * (mats[int(index[t, j])] @ xt) for j in range(index.shape[1]))
                out[t] = w_out @ F.gelu(h)
            else:
                out[t] = sum(float(gates[t, j]) * (downs[e] @ F.gelu(ups[e] @ xt))
                             for j, e in enumerate(index[t].tolist()))
    return out


def identity_router_layer(n: int, k: int, noise: float = 0.0) -> ButterflyMoE:
    """d_model = n and gate = I: the router's logits are the input itself."""
    layer = ButterflyMoE(n, 8, n_experts=n, top_k=k, router_noise=noise)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.eye(n))
    return layer


def test_router_picks_top_k_hand_computed():
    router = identity_router_layer(5, 2).router.eval()
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5, 0.3],   # top-2: expert 1 (2.0), expert 3 (0.5)
                           [-3.0, -2.0, -0.5, -4.0, -1.0],  # all negative: experts 2, 4
                           [1.0, 0.0, 0.0, 0.0, 4.0]])   # experts 4, 0
    gates, index, balance = router(logits)
    assert index.tolist() == [[1, 3], [2, 4], [4, 0]]
    assert balance is None  # eval mode
    # softmax over the two chosen logits: σ(gap) = 1 / (1 + e^−gap), gaps 1.5, 0.5, 3.0
    expected = [[0.8175744762, 0.1824255238], [0.6224593312, 0.3775406688], [0.9525741268, 0.0474258732]]
    torch.testing.assert_close(gates, torch.tensor(expected), rtol=0, atol=1e-6)


def test_router_top1_gate_is_one():
    router = identity_router_layer(4, 1).router.eval()
    gates, index, _ = router(torch.tensor([[0.2, -0.1, 0.9, 0.8]]))
    assert index.tolist() == [[2]] and gates.tolist() == [[1.0]]


def test_balance_loss_hand_computed():
    # N=2, no noise: logits (0, ln 3) → softmax (1/4, 3/4); logits (0, 0) → (1/2, 1/2).
    # frac = mean over the 2 tokens = (3/8, 5/8); loss = mean_i (frac_i − 1/2)² = (1/64 + 1/64) / 2 = 1/64
    layer = identity_router_layer(2, 1).train()
    x = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    layer(x)
    torch.testing.assert_close(layer.balance_loss, torch.tensor(1 / 64), rtol=1e-6, atol=0)
    # balance_loss(model) sums the layers' losses: a second layer on a uniform batch adds 0
    model = torch.nn.Sequential(layer, identity_router_layer(2, 1).train())
    model[0](x)
    model[1](torch.zeros(3, 2))
    torch.testing.assert_close(balance_loss(model), torch.tensor(1 / 64), rtol=1e-6, atol=0)
    # N=4, one token with logits (ln 1, ln 2, ln 3, ln 4): frac = (.1, .2, .3, .4), 1/N = .25
    # loss = (.15² + .05² + .05² + .15²) / 4 = .0125
    layer4 = identity_router_layer(4, 2).train()
    layer4(torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]])))
    torch.testing.assert_close(layer4.balance_loss, torch.tensor(0.0125), rtol=1e-5, atol=0)
    layer4.eval()
    layer4(x.new_zeros(1, 4))
    assert layer4.balance_loss is None


def test_training_router_adds_noise_to_logits():
    layer = identity_router_layer(4, 1, noise=0.5).train()
    x = torch.tensor([[0.0, 0.01, 0.02, 0.03]] * 64)  # nearly tied: noise must spread the choices
    torch.manual_seed(0)
    _, index, _ = layer.router(x)
    assert len(index.unique()) >= 3
    _, index, _ = layer.router.eval()(x)
    assert index.unique().tolist() == [3]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dims", [(48, 96), (32, 64)])
def test_layer_equals_dense_reconstruction(variant, form, dims):
    d, f = dims
    layer = make_layer(variant, form, d, f).eval()
    x = torch.randn(2, 13, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    assert y.shape == x.shape
    flat = x.reshape(-1, d)
    ref = reference_forward(layer, flat)
    scale = ref.abs().max().item()
    assert scale > 1e-2
    torch.testing.assert_close(y.reshape(-1, d).double(), ref, rtol=1e-5, atol=1e-5 * scale)
    # the layer routes as the independent reference, and every expert is exercised by some token
    _, index, _ = layer.router(flat)
    assert index.tolist() == reference_routing(layer, flat)[1].tolist()
    assert len(index.unique()) >= 3


@pytest.mark.parametrize("variant", ["butterfly", "static"])
@pytest.mark.parametrize("dims", [(48, 96), (64, 32), (5, 7)])
def test_butterfly_expert_matrix_independent(variant, dims):
    d_in, d_out = dims
    torch.manual_seed(3)
    bank = make_experts(variant, d_in, d_out, 3)
    assert isinstance(bank, ButterflyExperts)
    with torch.no_grad():
        if variant == "butterfly":
            bank.theta.angles.normal_(0, 0.7)
            bank.phi.angles.normal_(0, 0.7)
    trits, scale = quantize(bank.weight)
    q = trits.double() * scale.double()[:, None]
    for i in range(3):
        theta = bank.theta.matrix(i).double()
        phi = bank.phi.matrix(i).double()
        assert theta.shape == (d_out, d_out) and phi.shape == (d_in, d_in)
        ref = theta @ q @ phi.T
        torch.testing.assert_close(bank.expert_matrix(i).double(), ref, rtol=1e-5, atol=1e-6)
    # and forward on rows of expert i is x @ W_iᵀ
    x = torch.randn(9, d_in, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    with torch.no_grad():
        y = bank(x, idx)
    for r in range(9):
        ref = bank.expert_matrix(int(idx[r])).double() @ x[r].double()
        torch.testing.assert_close(y[r].double(), ref, rtol=1e-5, atol=1e-5)


def test_experts_differ_but_share_one_prototype():
    torch.manual_seed(0)
    bank = ButterflyExperts(16, 32, 4)
    with torch.no_grad():
        bank.theta.angles.normal_(0, 0.7)
        bank.phi.angles.normal_(0, 0.7)
    mats = [bank.expert_matrix(i) for i in range(4)]
    assert (mats[0] - mats[1]).abs().max() > 1e-2
    # orthogonal rotations keep the singular values of the shared prototype
    sv = [torch.linalg.svdvals(m.double()) for m in mats]
    for s in sv[1:]:
        torch.testing.assert_close(s, sv[0], rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in bank.parameters()) == 16 * 32 + 4 * (5 * 16 + 4 * 8)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_trainable_part(variant, form):
    layer = make_layer(variant, form).train()
    x = torch.randn(40, 48, generator=torch.Generator().manual_seed(4))
    target = torch.randn(40, 48, generator=torch.Generator().manual_seed(5))
    y = layer(x)
    task = ((y - target) ** 2).mean()
    bal = balance_loss(layer)
    assert bal.requires_grad and bal.item() >= 0
    (task + 0.01 * bal).backward()
    for bank in banks(layer):
        assert bank.weight.grad is not None and bank.weight.grad.abs().sum() > 0
        if variant == "butterfly":
            for rot in (bank.theta, bank.phi):
                assert rot.angles.grad is not None, "angles detached"
                assert rot.angles.grad[:, rot.active].abs().sum() > 0
                assert (rot.angles.grad[:, ~rot.active] == 0).all()
    gate = layer.router.gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    # the router learns from the task loss alone (gates not detached) and from the balance loss alone
    for part in ("task", "balance"):
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        loss = ((y - target) ** 2).mean() if part == "task" else balance_loss(layer)
        loss.backward()
        assert gate.grad is not None and gate.grad.abs().sum() > 0, f"no router gradient from the {part} loss"


def test_static_angles_are_frozen_buffers():
    layer = make_layer("static", "ffn")
    names = dict(layer.named_parameters())
    assert not any(n.endswith("angles") for n in names)
    buffers = dict(layer.named_buffers())
    angle_buffers = [n for n in buffers if n.endswith("angles")]
    assert sorted(angle_buffers) == ["down.phi.angles", "down.theta.angles", "up.phi.angles", "up.theta.angles"]
    assert all(n in layer.state_dict() for n in angle_buffers)  # saved with the model
    before = {n: buffers[n].clone() for n in angle_buffers}
    w_before = layer.up.weight.detach().clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer.train()
    x = torch.randn(20, 48, generator=torch.Generator().manual_seed(8))
    (layer(x).pow(2).mean() + balance_loss(layer)).backward()
    opt.step()
    for n in angle_buffers:
        assert torch.equal(dict(layer.named_buffers())[n], before[n])
        assert not dict(layer.named_buffers())[n].requires_grad
    assert not torch.equal(layer.up.weight, w_before)  # while the prototype did train


class MatmulCounter(TorchFunctionMode):
    MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm,
               torch.nn.functional.linear, torch.einsum}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list]] = []
        self.n_total = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.n_total += 1
        if func in self.MATMULS:
            self.calls.append((getattr(func, "__name__", str(func)),
                               [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **kwargs)


def count_forward(n_experts: int, rows: int, idx_seed: int) -> MatmulCounter:
    torch.manual_seed(0)
    bank = ButterflyExperts(48, 96, n_experts)
    x = torch.randn(rows, 48)
    idx = torch.randint(0, n_experts, (rows,), generator=torch.Generator().manual_seed(idx_seed))
    with MatmulCounter() as counter:
        bank(x, idx)
    return counter


def test_butterfly_forward_has_one_prototype_matmul_and_no_expert_loop():
    c = count_forward(8, 30, 0)
    assert len(c.calls) == 1, c.calls
    name, shapes = c.calls[0]
    assert shapes == [(30, 48), (48, 96)], c.calls  # [R, d_in] @ [d_in, d_out]: all (token, expert) rows at once
    # the amount of work issued does not depend on how many experts exist or which ones are used
    for n, rows, seed in ((2, 30, 1), (64, 30, 2), (8, 30, 3)):
        other = count_forward(n, rows, seed)
        assert other.n_total == c.n_total and len(other.calls) == 1


def test_independent_experts_match_per_expert_product():
    torch.manual_seed(0)
    bank = IndependentExperts(6, 10, 5)
    x = torch.randn(12, 6)
    idx = torch.tensor([4, 4, 0, 1, 4, 3, 0, 0, 1, 4, 3, 3])  # expert 2 unused
    y = bank(x, idx)
    for r in range(12):
        torch.testing.assert_close(y[r], bank.weight[idx[r]] @ x[r])


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_power_of_two_dims(variant):
    layer = make_layer(variant, "ffn", d=48, f=96, n=3)
    x = torch.randn(4, 7, 48, generator=torch.Generator().manual_seed(9))
    layer.train()
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    (y.pow(2).mean() + balance_loss(layer)).backward()
    if variant == "butterfly":
        assert layer.up.theta.angles.shape == (3, 7, 64)  # d_ff 96 → P 128: 7 stages of 64 pairs
        assert layer.up.phi.angles.shape == (3, 6, 32)  # d 48 → P 64


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown variant"):
        ButterflyMoE(8, 16, variant="sparse")
    with pytest.raises(ValueError, match="unknown expert form"):
        ButterflyMoE(8, 16, expert_form="glu")
    with pytest.raises(ValueError, match="top_k"):
        ButterflyMoE(8, 16, n_experts=2, top_k=3)


def test_top1_and_topk_all():
    for k in (1, 4):
        layer = make_layer("butterfly", "paper", n=4, k=k).eval()
        x = torch.randn(10, 48, generator=torch.Generator().manual_seed(10))
        with torch.no_grad():
            y = layer(x)
        ref = reference_forward(layer, x)
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        gates, _, _ = layer.router(x)
        torch.testing.assert_close(gates.sum(-1), torch.ones(10))
