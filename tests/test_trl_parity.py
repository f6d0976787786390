"""Gradient parity with TRL 1.16: its own GRPOTrainer loss against our module's real training path.

TRL's side is a real ``trl.GRPOTrainer`` with generation bypassed: its ``_compute_loss`` (fused LM head, its
normalisations, its clipping) runs on hand-built micro-batches, as its training loop would feed them. Our side is
``GRPOModule.accumulate_gradients`` on a hand-built ``Rollout``: the fused head, the shared prompt forward and
micro-batching, exactly what ``training_step`` runs. Both get the same tiny model (a perturbed copy, so the
reference differs), the same advantages (one group with equal rewards), the same old log-probs (perturbed, so
ratios are clipped) and the same reference log-probs, on completions of unequal length padded to different widths.

Where we differ from TRL on purpose, a test pins the difference (``bnpo`` across micro-batches).
Prompts have equal lengths: TRL passes no position ids, so a left-padded prompt is read at shifted positions
there, while we (and vLLM, and ``generate``) count positions from the first real token.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from grpo_lightning.algorithm import group_advantages
from grpo_lightning.batch import completion_mask
from grpo_lightning.config import GRPOConfig
from grpo_lightning.logprobs import sequence_logprobs
from grpo_lightning.module import GRPOModule
from grpo_lightning.rollout import Rollout, SamplingConfig

trl = pytest.importorskip("trl")

G, TEMPERATURE, MAX_TOKENS = 4, 0.9, 8
LENGTHS = [5, 3, 7, 1, 4, 6, 2, 7]  # N = 2 prompts × G completions, unequal lengths
REWARDS = [1.0, 0.0, 0.5, 2.0, 0.1, 0.1, 0.1, 0.1]  # the second group's rewards are all equal: advantages 0
RTOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_tokenizer, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    ours = copy.deepcopy(reference).train()
    with torch.no_grad():  # the policy has moved away from the reference: the KL term is not 0
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = copy.deepcopy(ours)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=len(LENGTHS), num_generations=G,
        temperature=TEMPERATURE, max_completion_length=MAX_TOKENS, beta=0.0, report_to=[], use_cpu=True,
        save_strategy="no", disable_dropout=True, bf16=False,  # TRL defaults to bf16 autocast; both sides in float32
    )  # fmt: skip
    trainer = trl.GRPOTrainer(
        model=theirs, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], args=args,
        train_dataset=Dataset.from_dict({"prompt": ["unused"] * len(LENGTHS)}), processing_class=tiny_tokenizer,
    )  # fmt: skip
    trainer.model.train()
    their_reference = copy.deepcopy(reference)  # TRL patches its reference model the same way as its policy
    trl.trainer.utils.add_fused_lm_head(their_reference, temperature=TEMPERATURE)

    vocab = ours.config.vocab_size
    pad = tiny_tokenizer.pad_token_id
    draw = lambda n: [t for t in torch.randint(3, vocab, (n,)).tolist()]  # noqa: E731
    prompts = [draw(6), draw(6)]  # equal lengths: see the module docstring
    rollout = Rollout(prompts, [draw(n) for n in LENGTHS], [""] * len(LENGTHS), [False] * len(LENGTHS), G)
    module = our_module()
    module.policy, module.tokenizer = ours, tiny_tokenizer
    row_prompts = [prompts[i // G] for i in range(len(LENGTHS))]
    mask = completion_mask(rollout.completion_ids)  # [N, T]
    current = module.logprobs_without_grad(ours, row_prompts, rollout)
    ref_logp = module.logprobs_without_grad(reference, row_prompts, rollout)
    old_logp = current + 0.15 * torch.randn_like(current) * mask  # as after earlier updates: some ratios get clipped
    engine_logp = old_logp + 0.3 * torch.randn_like(current) * mask  # a rollout engine computing other numbers
    return dict(
        reference=reference, their_reference=their_reference, ours=ours, theirs=theirs, trainer=trainer,
        tokenizer=tiny_tokenizer, pad=pad,
        rollout=rollout, row_prompts=row_prompts, mask=mask, old_logp=old_logp, ref_logp=ref_logp,
        engine_logp=engine_logp, advantages=group_advantages(torch.tensor(REWARDS), G),
    )  # fmt: skip


def our_module(**grpo) -> GRPOModule:
    sampling = SamplingConfig(temperature=TEMPERATURE, max_tokens=MAX_TOKENS)
    return GRPOModule(grpo=GRPOConfig(num_generations=G, **grpo), sampling=sampling)


def our_step(s, mismatch: bool = False, **grpo) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our gradient: GRPOModule.accumulate_gradients, the path training_step takes (μ > 1: old log-probs given)."""
    module = our_module(**grpo)
    module.policy, module.tokenizer = s["ours"], s["tokenizer"]
    rollout = s["rollout"]
    if mismatch:
        rollout = copy.copy(rollout)
        rollout.logprobs = [row[:n].tolist() for row, n in zip(s["engine_logp"], LENGTHS, strict=False)]
    s["ours"].zero_grad(set_to_none=True)
    inputs = (s["row_prompts"], rollout, s["advantages"], s["mask"], s["old_logp"], s["ref_logp"])
    stats = module.accumulate_gradients(*inputs)
    return stats, {name: p.grad.clone() for name, p in s["ours"].named_parameters()}


def trl_batch(s) -> dict[str, torch.Tensor]:
    """The step's rows as TRL's _generate_and_score_completions returns them, completions padded to MAX_TOKENS."""
    n, T = len(LENGTHS), s["mask"].shape[1]
    completion_ids = torch.full((n, MAX_TOKENS), s["pad"], dtype=torch.long)
    for i, ids in enumerate(s["rollout"].completion_ids):
        completion_ids[i, : len(ids)] = torch.tensor(ids)
    widen = lambda x: torch.nn.functional.pad(x, (0, MAX_TOKENS - T))  # noqa: E731
    prompt_ids = torch.tensor(s["row_prompts"])
    return {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": widen(s["mask"]).long(), "advantages": s["advantages"],
        "old_per_token_logps": widen(s["old_logp"]), "ref_per_token_logps": widen(s["ref_logp"]),
        "sampling_per_token_logps": widen(s["engine_logp"]),
    }  # fmt: skip


def trl_mismatch_ratio(batch, mode: str, cap: float) -> torch.Tensor:
    """TRL 1.16's importance-sampling ratio, transcribed from GRPOTrainer._generate_and_score_completions (where it
    is computed inline during generation, so it cannot be called alone); clip_min = None."""
    diff = (batch["old_per_token_logps"] - batch["sampling_per_token_logps"]) * batch["completion_mask"]
    diff = torch.nan_to_num(diff, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=None, max=cap)
    return ratio.masked_fill((ratio < -math.inf) | (ratio > cap), value=0.0)


def trl_step(s, micro_batches: int, *, loss_type="grpo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
             importance_sampling_level="token", use_bias_correction_kl=False, top_entropy_quantile=1.0,
             mismatch: tuple[str, float] | None = None) -> tuple[float, dict[str, torch.Tensor]]:  # fmt: skip
    """TRL's gradient: GRPOTrainer._compute_loss on each micro-batch, backward, as Trainer.training_step does."""
    trainer, model = s["trainer"], s["theirs"]
    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.epsilon_low, trainer.epsilon_high = epsilon_low, epsilon_high
    trainer.importance_sampling_level, trainer.top_entropy_quantile = importance_sampling_level, top_entropy_quantile
    trainer.args.use_bias_correction_kl = use_bias_correction_kl
    trainer.current_gradient_accumulation_steps = trainer.args.steps_per_generation = micro_batches
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = mismatch is not None
    batch = trl_batch(s)
    if mismatch is not None:
        batch["importance_sampling_ratio"] = trl_mismatch_ratio(batch, *mismatch)
    model.zero_grad(set_to_none=True)
    total, size = 0.0, len(LENGTHS) // micro_batches
    for start in range(0, len(LENGTHS), size):
        inputs = {key: value[start : start + size] for key, value in batch.items()}
        inputs["num_items_in_batch"] = batch["completion_mask"].sum()  # the whole step's tokens, as TRL counts them
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rtol: float = RTOL) -> None:
    assert ours.keys() == theirs.keys()
    scale = max(g.norm() for g in theirs.values())
    assert scale > 0
    for name, want in theirs.items():
        error = (ours[name] - want).norm()
        assert error <= rtol * want.norm() + 1e-7 * scale, (name, float(error), float(want.norm()))


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


def test_token_logprobs_and_entropy_equal_trls(setup):
    s = setup
    batch = trl_batch(s)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    with torch.no_grad():
        theirs, their_entropy, _ = s["trainer"]._get_per_token_logps_and_entropies(
            s["theirs"], ids, attention, MAX_TOKENS, compute_entropy=True
        )
        their_ref, _, _ = s["trainer"]._get_per_token_logps_and_entropies(
            s["their_reference"], ids, attention, MAX_TOKENS
        )
    module = our_module()
    module.policy, module.tokenizer = s["ours"], s["tokenizer"]
    from grpo_lightning.batch import pack_sequences

    seqs = pack_sequences(s["row_prompts"], s["rollout"].completion_ids, s["pad"])
    with torch.no_grad():
        ours, our_entropy = sequence_logprobs(s["ours"], seqs, with_entropy=True, **module.logprob_options())
    mask, T = s["mask"].bool(), s["mask"].shape[1]
    assert torch.allclose(ours[mask], theirs[:, :T][mask], rtol=1e-5, atol=1e-5)
    assert torch.allclose(our_entropy[mask], their_entropy[:, :T][mask], rtol=1e-5, atol=1e-5)
    assert torch.allclose(s["ref_logp"][mask], their_ref[:, :T][mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_and_every_gradient_equal_trls(setup, loss_type, micro_batches):
    stats, ours = our_step(setup, loss_type=loss_type, gradient_accumulation_steps=micro_batches, epsilon_high=0.28,
                           bnpo_per_micro_batch=True)  # fmt: skip
    loss, theirs = trl_step(setup, micro_batches, loss_type=loss_type)
    assert stats.loss == pytest.approx(loss, rel=RTOL, abs=1e-7)
    assert stats.clip_ratio_low + stats.clip_ratio_high > 0  # the clip is exercised
    assert_same_gradients(ours, theirs)


def test_our_default_bnpo_normalises_by_the_whole_step_and_differs_from_trls_across_micro_batches(setup):
    _, ours_one = our_step(setup, loss_type="bnpo", gradient_accumulation_steps=1, epsilon_high=0.28)
    _, ours_four = our_step(setup, loss_type="bnpo", gradient_accumulation_steps=4, epsilon_high=0.28)
    _, theirs_four = trl_step(setup, 4, loss_type="bnpo")
    assert_same_gradients(ours_four, ours_one)  # ours: the same gradient however the step is split
    assert relative_difference(ours_four, theirs_four) > 0.01  # TRL's: every micro-batch by its own token count


@pytest.mark.parametrize("loss_type, micro_batches", [("grpo", 1), ("grpo", 2), ("dapo", 2), ("dr_grpo", 1)])
def test_sequence_level_importance_sampling_equals_trls(setup, loss_type, micro_batches):
    kwargs = dict(loss_type=loss_type, importance_sampling_level="sequence")
    _, ours = our_step(setup, gradient_accumulation_steps=micro_batches, epsilon_high=0.28, **kwargs)
    _, theirs = trl_step(setup, micro_batches, **kwargs)
    assert_same_gradients(ours, theirs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("corrected", [False, True])
def test_both_kl_forms_equal_trls(setup, corrected, level):
    kwargs = dict(beta=0.3, importance_sampling_level=level, use_bias_correction_kl=corrected)
    stats, ours = our_step(setup, gradient_accumulation_steps=1, epsilon_high=0.28, **kwargs)
    loss, theirs = trl_step(setup, 1, **kwargs)
    assert stats.loss == pytest.approx(loss, rel=RTOL)
    assert stats.kl == pytest.approx(setup["trainer"]._metrics["train"]["kl"][-1], rel=RTOL)
    assert_same_gradients(ours, theirs)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_top_entropy_masking_equals_trls(setup, micro_batches):
    # quantile 0.35 puts the threshold between two tokens' entropies, not on one, in every micro-batch
    kwargs = dict(gradient_accumulation_steps=micro_batches, epsilon_high=0.28, top_entropy_quantile=0.35)
    stats, ours = our_step(setup, **kwargs)
    _, theirs = trl_step(setup, micro_batches, top_entropy_quantile=0.35)
    _, unmasked = trl_step(setup, micro_batches)
    assert_same_gradients(ours, theirs)
    assert relative_difference(theirs, unmasked) > 0.05  # the mask changed the gradient
    if micro_batches == 1:
        assert stats.entropy == pytest.approx(setup["trainer"]._metrics["train"]["entropy"][-1], rel=1e-5)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_mismatch_correction_modes_equal_trls(setup, mode):
    cap = 1.5
    stats, ours = our_step(setup, mismatch=True, gradient_accumulation_steps=2, epsilon_high=0.28,
                           importance_sampling_cap=cap, importance_sampling_mode=mode)  # fmt: skip
    _, theirs = trl_step(setup, 2, mismatch=(mode, cap))
    assert_same_gradients(ours, theirs)
    diff = (setup["old_logp"] - setup["engine_logp"]).abs()[setup["mask"].bool()]
    assert stats.logprob_diff_mean == pytest.approx(float(diff.mean()), rel=1e-5)
    assert stats.logprob_diff_max == pytest.approx(float(diff.max()), rel=1e-5)
