from __future__ import annotations

import pytest
import torch

from dsv4.platforms import get_platform
from dsv4.train.muon import Muon, orthogonalize, split_parameters


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_orthogonalize_flattens_singular_values(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    left = torch.linalg.qr(torch.randn(shape[0], k, generator=g))[0]
    right = torch.linalg.qr(torch.randn(shape[1], k, generator=g))[0]
    u = left @ torch.diag(torch.logspace(-1, 1, k)) @ right.T  # condition number 100
    s_after = torch.linalg.svdvals(orthogonalize(u))
    # Newton-Schulz with these coefficients lands singular values roughly in [0.5, 1.3]
    assert s_after.min() > 0.3 and s_after.max() < 1.4


def test_muon_with_adamw_fits_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    x = torch.randn(256, 16)
    y = x[:, :4] * 2 - x[:, 4:8]
    matrices, rest = split_parameters(model)
    assert len(matrices) == 2 and len(rest) == 2  # weights vs biases
    opt_m, opt_a = Muon(matrices, lr=0.02), torch.optim.AdamW(rest, lr=1e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt_m.zero_grad(), opt_a.zero_grad()
        loss.backward()
        opt_m.step(), opt_a.step()
    assert loss.item() < 0.1 * first


def test_muon_refuses_non_matrices():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_weight_decay_is_decoupled_and_follows_the_learning_rate():
    # A zero gradient orthogonalises to a zero step, so only the decay moves the weights.
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([w], lr=0.05, weight_decay=0.1)
    w.grad = torch.zeros_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((8, 8), 1 - 0.05 * 0.1))
    opt.param_groups[0]["lr"] = 0.0  # a schedule at zero stops the decay too
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((8, 8), 1 - 0.05 * 0.1))
    with pytest.raises(ValueError, match="weight_decay"):
        Muon([w], weight_decay=-0.1)


def test_orthogonalize_batches_like_one_at_a_time():
    stack = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(1))
    together = orthogonalize(stack)
    for i in range(3):
        torch.testing.assert_close(together[i], orthogonalize(stack[i]), atol=1e-2, rtol=0)


@pytest.mark.parametrize("bf16_matmul", [False, True])
def test_newton_schulz_runs_in_float32_on_a_cpu_without_bf16_matmuls(monkeypatch, bf16_matmul):
    # Without bf16 hardware a bf16 matmul is tens of times slower than float32 (a 3 s
    # dsv4-tiny training step took 43 s), so the iteration must not use it there.
    import dsv4.train.muon as muon

    monkeypatch.setattr("dsv4.platforms.cpu.has_bf16_matmul", lambda: bf16_matmul)
    u = torch.randn(2, 24, 40, generator=torch.Generator().manual_seed(2))
    x = u / u.norm(dim=(-2, -1), keepdim=True)
    a, b, c = muon.NS_COEFFICIENTS
    for _ in range(5):  # the textbook iteration in float32
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    error = (orthogonalize(u) - x).abs().max().item()
    if bf16_matmul:
        assert error > 1e-4  # bf16 rounding shows
    else:
        assert error < 1e-5


def test_muon_step_in_cache_sized_stacks_moves_each_matrix_by_its_own_update():
    from dsv4.train.muon import stack_size

    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(64, 64, generator=g)) for _ in range(70)]
    grads = [torch.randn(64, 64, generator=g) for _ in params]
    assert stack_size(torch.stack(grads)) == 64  # 70 matrices: two stacks, 64 + 6
    before = [p.detach().clone() for p in params]
    opt = Muon(params, lr=0.1, momentum=0.9, nesterov=True)
    for p, grad in zip(params, grads):
        p.grad = grad
    opt.step()
    # In bf16 (a CPU with bf16 matmuls) a stack and a lone matrix round differently: on an AMX
    # Xeon they differ by up to 9e-4 here. Another matrix's update differs by ~5e-2.
    atol = 3e-3 if get_platform("cpu").default_dtype == torch.bfloat16 else 1e-5
    for i, (p, old, grad) in enumerate(zip(params, before, grads)):
        nesterov = grad + 0.9 * grad  # first step: the momentum buffer is the gradient
        torch.testing.assert_close(p.detach(), old - 0.1 * orthogonalize(nesterov),
                                   atol=atol, rtol=0)
        other = 1.9 * grads[i - 1]
        assert (p.detach() - (old - 0.1 * orthogonalize(other))).abs().max() > 10 * atol
