"""sparse_runtime.recover.losses: the chunked KD loss and its gradient against a float64 reference."""
import pytest
import torch

from sparse_runtime.recover import losses


def reference_kd(s, t, temperature):
    ls = torch.log_softmax(s.double() / temperature, -1)
    lt = torch.log_softmax(t.double() / temperature, -1)
    return (lt.exp() * (lt - ls)).sum(-1).mean() * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape", [(3, 45, 97), (1, 1, 5), (2, 64, 33)])  # rows past, under and at a chunk
def test_kd_and_its_gradient_match_a_float64_reference(shape, temperature):
    g = torch.Generator().manual_seed(sum(shape))
    s = (torch.randn(shape, generator=g) * 3).requires_grad_()
    t = torch.randn(shape, generator=g) * 3
    loss = losses.kd(s, t, temperature)
    (loss * 0.7).backward()
    s64 = s.detach().double().requires_grad_()
    ref = reference_kd(s64, t, temperature)
    (ref * 0.7).backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-8)


def test_kd_of_bf16_logits_gives_a_bf16_gradient_and_no_gradient_to_the_teacher():
    s = torch.randn(2, 70, 50).bfloat16().requires_grad_()
    t = torch.randn(2, 70, 50).bfloat16().requires_grad_()
    losses.kd(s, t).backward()
    s64 = s.detach().double().requires_grad_()
    reference_kd(s64, t.detach(), 1.0).backward()
    assert s.grad.dtype == torch.bfloat16 and t.grad is None
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=2e-2, atol=1e-5)


def test_kd_is_zero_for_the_teachers_own_logits():
    t = torch.randn(130, 41)
    assert losses.kd(t.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
