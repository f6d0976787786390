"""How often a model is right when it samples, at each temperature, with a recipe's prompt (BENCHMARKS.md §1b).

    python benchmarks/sampled_accuracy.py --config configs/smollm2-135m-cpu.yaml --limit 100 --samples 4

GRPO learns only from groups whose completions differ in reward, so the rate at which the *sampled* completions
of the base model are right (not its greedy accuracy) is what the correctness reward can amplify. For each
temperature this prints the lenient accuracy (the last number equals the reference, as ``grpo evaluate``), the
share of completions with an ``<answer>`` tag, that close ``</reasoning>``, in the soft and the strict format, the
mean ``format_when_right_reward_func`` (the format signal that survives when only right answers are paid), and the
share cut at the token limit, on the recipe's first ``--limit`` training problems (the recipe's policy, prompt and
``sampling.max_tokens``; temperature 0 is greedy). ``--response-prefix`` starts the model's turn with a text (e.g.
``'<reasoning>\n'``, as DeepSeek-R1-Zero's template starts it with ``<think>``); the prefix counts as part of each
completion when it is scored.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, action="append", help="training recipe (repeat to overlay files)")
    parser.add_argument("--limit", type=int, default=100, help="training problems to sample (default: 100)")
    parser.add_argument("--samples", type=int, default=4, help="completions per problem above temperature 0")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.3, 0.6, 0.9])
    parser.add_argument("--engine", default="vllm", help="vllm or hf (default: vllm)")
    parser.add_argument("--response-prefix", default="", help="text the model's turn starts with (default: none)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from grpo_lightning.cli import main as cli_main
    from grpo_lightning.data import encode_prompt
    from grpo_lightning.models import check_loadable, load_model
    from grpo_lightning.rewards import (
        format_when_right_reward_func,
        lenient_match,
        soft_format_reward_func,
        strict_format_reward_func,
    )
    from grpo_lightning.rollout import SamplingConfig, open_engine

    cli = cli_main([arg for path in args.config for arg in ("--config", path)] + ["--data.val_size", "0"], run=False)
    cli.datamodule.setup("fit")
    module, problems = cli.model, cli.datamodule.problems[: args.limit]
    policy = check_loadable(module.policy_config)
    loaded = load_model(policy.name_or_path, gguf_file=policy.gguf_file)
    engine = open_engine(loaded, args.engine, seed=0, quiet=True)
    prefix_ids = loaded.tokenizer.encode(args.response_prefix, add_special_tokens=False) if args.response_prefix else []
    prompts = [encode_prompt(loaded.tokenizer, p.question, style=module.prompt) + prefix_ids for p in problems]
    print(f"{len(problems)} problems of {' + '.join(args.config)}, ≤ {module.sampling.max_tokens} tokens")
    print(f"response prefix {args.response_prefix!r}")
    print("temperature  samples  lenient accuracy  <answer> tag  closes </reasoning>  soft format  strict format  "
          "format when right  truncated")  # fmt: skip
    for temperature in args.temperatures:
        n = 1 if temperature == 0 else args.samples
        sampling = SamplingConfig(temperature=temperature, max_tokens=module.sampling.max_tokens)
        rollout = engine.generate(prompts, n=n, sampling=sampling)
        texts = [args.response_prefix + t for t in rollout.texts]
        answers = [problems[i // n].answer for i in range(len(texts))]
        right = [lenient_match(t, a) for t, a in zip(texts, answers, strict=True)]
        tagged, closed = (["<answer>" in t for t in texts], ["</reasoning>" in t for t in texts])
        soft, strict = ([v > 0 for v in f(texts)] for f in (soft_format_reward_func, strict_format_reward_func))
        format_if_right = format_when_right_reward_func(texts, answers)
        k = len(texts)
        print(f"{temperature:11.1f}  {k:7d}  {sum(right) / k:16.3f}  {sum(tagged) / k:12.3f}  {sum(closed) / k:19.3f}  "
              f"{sum(soft) / k:11.3f}  {sum(strict) / k:13.3f}  {sum(format_if_right) / k:17.4f}  "
              f"{sum(rollout.truncated) / k:9.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
