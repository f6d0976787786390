"""The rollout worker: one process's rollout engine, from its lazy start to every weight sync (no Lightning).

The training module asks it for completions and tells it when the policy changed; the worker decides what that
costs: the engine starts on first use with this process's own sampling seed, a GGUF policy is written once as an HF
folder for vLLM to load, weights (LoRA merged) are pushed only when the engine holds its own copy, and the engine
frees its KV cache between generations. The factory that builds the engine is a parameter, so tests drive a whole
GRPO step with a scripted engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from grpo_lightning.export import save_hf_folder
from grpo_lightning.models import ModelConfig, merged_weights
from grpo_lightning.rollout import Rollout, RolloutEngine, SamplingConfig, VLLMConfig, make_engine

EngineFactory = Callable[..., RolloutEngine]
"""``factory(kind, model, tokenizer, *, model_path, vllm, seed) -> RolloutEngine`` (default :func:`make_engine`)."""


class RolloutWorker:
    """Owns one process's rollout engine: start, generate, sync, sleep."""

    def __init__(self, kind: str = "hf", vllm: VLLMConfig | None = None, factory: EngineFactory | None = None) -> None:
        if kind not in ("hf", "vllm"):
            raise ValueError(f"invalid GRPO configuration:\n  engine={kind!r}: use 'hf' or 'vllm'")
        self.kind, self.vllm, self.factory = kind, vllm or VLLMConfig(), factory
        self.engine: RolloutEngine | None = None
        self.stale = True  # the engine's weights may differ from the policy's (new engine, restored checkpoint)

    def start(self, policy: Any, tokenizer: Any, *, seed: int, model_path: Callable[[], str | None]) -> None:
        """Build the engine on first use (``model_path`` is asked only then), and sync it if the policy changed."""
        if self.engine is None:
            factory = self.factory or make_engine
            self.engine = factory(self.kind, policy, tokenizer, model_path=model_path(), vllm=self.vllm, seed=seed)
        if self.stale:
            self.sync(policy)

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> tuple[Rollout, float]:
        """``n`` completions per prompt and the seconds they took; the engine sleeps again afterwards."""
        start = time.perf_counter()
        rollout = self.engine.generate(prompt_ids, n=n, sampling=sampling)
        self.engine.sleep()  # free the KV cache while the policy trains
        return rollout, time.perf_counter() - start

    def sync(self, policy: Any) -> float:
        """Push the policy's weights into the engine unless it generates with the policy itself; returns seconds."""
        start = time.perf_counter()
        if not self.engine.generates_with(policy):
            self.engine.update_weights(merged_weights(policy))  # LoRA: W + (α/r)·B·A under the base names
        self.stale = False
        return time.perf_counter() - start

    def hf_folder(self, config: ModelConfig, policy: Any, tokenizer: Any, run_dir: str | Path, *, writer: bool,
                  barrier: Callable[[], None]) -> str | None:  # fmt: skip
        """The HF folder vLLM loads: the policy's own, or for a GGUF file a converted copy in ``run_dir``, written by
        the ``writer`` process while the others wait at ``barrier``. ``config`` has its ``pkg:`` name resolved."""
        if self.kind != "vllm" or not config.gguf_file:
            return config.name_or_path
        folder = Path(run_dir) / "policy-hf"
        if writer and not (folder / "config.json").is_file():
            save_hf_folder(policy, tokenizer, folder)
        barrier()
        return str(folder)
