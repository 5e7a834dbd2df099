"""value_and_jacobian (two reverse passes) against torch.func.jacfwd and central differences."""

import torch

from spread_dials.refine.derivatives import value_and_jacobian


def _fn(x: torch.Tensor) -> torch.Tensor:
    """(5, 4) outputs of 3 inputs, mixing them with constants (the case forward mode is slow on)."""
    grid = torch.linspace(0.0, 1.0, 20, dtype=x.dtype).view(5, 4)
    return torch.exp(-((grid - x[0]) ** 2) / (0.1 + x[1] ** 2)) * torch.cos(3.0 * grid * x[2]) + grid * x[0] * x[1]


def test_jacobian_equals_forward_mode_and_finite_differences():
    x = torch.tensor([0.3, 0.4, 1.7], dtype=torch.float64)
    value, jacobian = value_and_jacobian(_fn, x)
    assert value.shape == (5, 4) and jacobian.shape == (5, 4, 3)
    assert torch.equal(value, _fn(x))
    torch.testing.assert_close(jacobian, torch.func.jacfwd(_fn)(x), rtol=1e-12, atol=1e-14)
    h = 1e-6
    for k in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[k] = h
        central = (_fn(x + step) - _fn(x - step)) / (2 * h)
        torch.testing.assert_close(jacobian[..., k], central, rtol=1e-7, atol=1e-8)
    assert not value.requires_grad and not jacobian.requires_grad


def test_inputs_the_function_ignores_give_zero_columns():
    value, jacobian = value_and_jacobian(lambda x: torch.ones(4, dtype=x.dtype) * x[0], torch.tensor([2.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(value, torch.full((4,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(jacobian, torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64))
    value, jacobian = value_and_jacobian(lambda x: torch.ones(3, dtype=x.dtype), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(jacobian, torch.zeros(3, 2, dtype=torch.float64))
