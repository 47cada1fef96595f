"""The loss functions against values computed by hand."""

import pytest
import torch
from diffusers import DDPMScheduler

from ablation import losses


def test_model_based_loss_is_mse_to_the_detached_teacher():
    student = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    teacher = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    loss = losses.model_based_loss(student, teacher)
    # differences 0, 1, 2, 3 -> squares 0, 1, 4, 9 -> mean 3.5
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    # d/ds mean((s - t)^2) = 2 (s - t) / 4 = [0, 0.5, 1, 1.5]; the teacher gets nothing (stop-gradient)
    assert torch.allclose(student.grad, torch.tensor([0.0, 0.5, 1.0, 1.5]))
    assert teacher.grad is None


def test_noise_based_loss():
    pred = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    eps = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    # (0.25 + 0.25 + 1 + 0) / 4 = 0.375
    assert losses.noise_based_loss(pred, eps).item() == pytest.approx(0.375)


def test_prior_preservation_loss_is_weighted():
    pred = torch.tensor([1.0, 3.0])
    eps = torch.tensor([0.0, 1.0])
    # 0.5 * (1 + 4) / 2 = 1.25
    assert losses.prior_preservation_loss(pred, eps, weight=0.5).item() == pytest.approx(1.25)


def _scheduler(prediction_type):
    # betas = [0.36, 0.36] -> alpha_bar_0 = 0.64: alpha_0 = sqrt(0.64) = 0.8, sigma_0 = sqrt(0.36) = 0.6
    return DDPMScheduler(num_train_timesteps=2, beta_start=0.36, beta_end=0.36, beta_schedule="linear",
                         prediction_type=prediction_type)


def test_regression_target_epsilon_v_and_sample():
    z0 = torch.full((1, 1, 1, 1), 2.0)
    eps = torch.full((1, 1, 1, 1), 1.0)
    t = torch.tensor([0])
    assert torch.equal(losses.regression_target(_scheduler("epsilon"), z0, eps, t), eps)
    # v = alpha_t * eps - sigma_t * z0 = 0.8 * 1 - 0.6 * 2 = -0.4
    v = losses.regression_target(_scheduler("v_prediction"), z0, eps, t)
    assert v.item() == pytest.approx(-0.4, abs=1e-6)
    assert torch.equal(losses.regression_target(_scheduler("sample"), z0, eps, t), z0)
