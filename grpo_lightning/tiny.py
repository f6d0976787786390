"""A tiny Qwen2-architecture model and tokenizer built offline, for the CPU demo and the tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in a second on synthetic GSM8K-style
text, with Qwen's chat markers and a Qwen-style chat template; the model is randomly initialised from a
``Qwen2Config``. The answer format's tags are single tokens, so a random model emits them now and then
and GRPO has a reward signal to amplify from the first step.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Qwen2's own split: AutoTokenizer rebuilds a `qwen2` checkpoint's tokenizer with it, so training with
# anything else would make the reloaded tokenizer differ from the saved one.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FORMAT_TOKENS = ["<reasoning>\n", "\n</reasoning>\n", "<answer>\n", "\n</answer>"]


def build_tokenizer(vocab_size: int = 320, seed: int = 0):
    """A ``PreTrainedTokenizerFast`` with ``vocab_size`` tokens (a multiple of 64), trained offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grpo_lightning.data import synthetic_rows
    from grpo_lightning.rewards import SYSTEM_PROMPT

    corpus = [SYSTEM_PROMPT] + [r["question"] + "\n" + r["answer"] for r in synthetic_rows(2000, seed=seed)]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    extra = len(SPECIAL_TOKENS) + len(FORMAT_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - extra,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.add_tokens(FORMAT_TOKENS)
    padding = [f"<|extra_{i}|>" for i in range(-len(tokenizer) % 64)]
    if padding:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *padding]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, hidden_size: int = 128, num_layers: int = 2, seed: int = 0, **config):
    """A randomly initialised ``Qwen2ForCausalLM`` (≈0.36 M parameters at the defaults)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=config.pop("intermediate_size", hidden_size * 2),
        num_hidden_layers=num_layers,
        num_attention_heads=config.pop("num_attention_heads", 4),
        num_key_value_heads=config.pop("num_key_value_heads", 2),
        max_position_embeddings=config.pop("max_position_embeddings", 1024),
        tie_word_embeddings=config.pop("tie_word_embeddings", True),
        **config,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def build_tiny_checkpoint(out_dir: str | Path, *, hidden_size: int = 128, num_layers: int = 2, seed: int = 0,
                          vocab_size: int | None = None, **config) -> Path:  # fmt: skip
    """Write a tiny model + tokenizer folder that ``from_pretrained`` (and vLLM) can load; returns it.

    ``vocab_size`` (default: the tokenizer's) may be larger, e.g. Qwen's 151,936 rows for a realistic head.
    """
    from grpo_lightning.export import save_hf_folder

    tokenizer = build_tokenizer(seed=seed)
    model = build_model(vocab_size or len(tokenizer), hidden_size, num_layers, seed, **config)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    return save_hf_folder(model, tokenizer, out_dir)
