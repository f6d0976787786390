"""The hand-written gradient clip of manual optimization: its norm is the true gradient's under every precision."""

import math

import pytest
import torch
from ddp_step import fit_one_step, scripted_module
from lightning.pytorch.plugins import MixedPrecision
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.optimization import adamw_warmup_cosine

pytestmark = pytest.mark.e2e  # one Trainer step each (about a second)


def _one_step(model: str, precision: str, fused: bool) -> tuple[float, float]:
    """The logged gradient norm and the size of the update to the embedding matrix."""
    module = scripted_module(model, max_grad_norm=0.1)
    if not fused:  # Lightning unscales 16-mixed's gradients before the hook for this one, not for the fused one

        def unfused_adamw():
            optimizer, scheduler = adamw_warmup_cosine(module.policy, module.optim, total_steps=1, fused=False)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        module.configure_optimizers = unfused_adamw
    if precision == "16-mixed":  # on CPU Lightning turns the "16-mixed" flag into bf16: the plugin is the real thing
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer = fit_one_step(module, 2, precision=None, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        assert scaler.get_scale() == 2.0**12  # no overflow: the update was applied
    else:
        trainer = fit_one_step(module, 2, precision=precision)
    assert bool(trainer.optimizers[0].defaults["fused"]) == fused
    before = AutoModelForCausalLM.from_pretrained(model).get_input_embeddings().weight
    update = (module.policy.get_input_embeddings().weight.detach() - before.detach()).norm()
    return float(trainer.callback_metrics["train/grad_norm"]), float(update)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "adamw"])
def test_16_mixed_clips_the_unscaled_gradient(tiny_checkpoint, fused):
    norm_32, update_32 = _one_step(str(tiny_checkpoint), "32-true", fused)
    norm_16, update_16 = _one_step(str(tiny_checkpoint), "16-mixed", fused)
    assert norm_32 > 0.1  # the clip acts
    assert norm_16 == pytest.approx(norm_32, rel=0.05)  # the loss scale (4096) is not in the logged norm
    assert update_16 == pytest.approx(update_32, rel=0.2)


def test_a_non_finite_gradient_stops_the_run_before_the_update(tiny_checkpoint, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan  # every log-prob, so every gradient, is NaN
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path)
    module = scripted_module(str(tmp_path), max_grad_norm=0.1)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm at step 0: the update was not applied"):
        fit_one_step(module, 2)
    after = dict(module.policy.named_parameters())
    assert all(
        torch.equal(p.detach(), after[n].detach()) for n, p in model.named_parameters() if n != "model.norm.weight"
    )
