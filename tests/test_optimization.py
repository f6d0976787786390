"""The optimizer builder: torch's fused AdamW where it applies, on the default AdamW's trajectory."""

import torch

from grpo_lightning.config import OptimConfig
from grpo_lightning.optimization import adamw_warmup_cosine, fused_adamw_applies

OPTIM = OptimConfig(lr=1e-2, warmup_ratio=0.0)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))


def _train(model, optimizer, scheduler, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        torch.manual_seed(100 + step)
        model(torch.randn(5, 8)).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _unfused(model):  # the builder's optimizer as runs before the fused default made it
    optimizer, scheduler = adamw_warmup_cosine(model, OPTIM, total_steps=20)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = None, False
    return optimizer, scheduler


def test_cpu_parameters_get_the_fused_adamw_with_decay_on_matrices_only():
    optimizer, _ = adamw_warmup_cosine(_model(), OptimConfig(), total_steps=10)
    assert all(group["fused"] for group in optimizer.param_groups)
    decay, no_decay = optimizer.param_groups
    assert [p.ndim for p in decay["params"]] == [2, 2] and decay["weight_decay"] == OptimConfig().weight_decay
    assert [p.ndim for p in no_decay["params"]] == [1, 1, 1, 1] and no_decay["weight_decay"] == 0.0


def test_fused_adamw_follows_the_default_adamw_trajectory():
    fused_model, plain_model = _model(), _model()
    _train(fused_model, *adamw_warmup_cosine(fused_model, OPTIM, total_steps=20), 8)
    _train(plain_model, *_unfused(plain_model), 8)
    start = _model()
    for got, want, initial in zip(fused_model.parameters(), plain_model.parameters(), start.parameters(), strict=True):
        assert not torch.allclose(got, initial)  # the steps moved it
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_unfused_adamw_resumes_in_the_builder_optimizer():
    resumed, straight = _model(), _model()
    before, schedule = _unfused(resumed)
    _train(resumed, before, schedule, 3)
    after, after_schedule = adamw_warmup_cosine(resumed, OPTIM, total_steps=20)
    after.load_state_dict(before.state_dict())
    after_schedule.load_state_dict(schedule.state_dict())
    _train(resumed, after, after_schedule, 2, first=3)
    _train(straight, *_unfused(straight), 5)
    for got, want in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_adamw_is_left_to_the_default_where_it_does_not_apply():
    assert fused_adamw_applies([torch.nn.Parameter(torch.zeros(2, 2))])
    assert not fused_adamw_applies([torch.nn.Parameter(torch.zeros(2, 2, device="meta"))])
    assert not fused_adamw_applies([])
