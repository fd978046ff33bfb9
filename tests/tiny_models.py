"""Tiny randomly initialised models for tests (no hub here): built from a config, seeded."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama(vocab_size: int, num_hidden_layers: int, **config: Any) -> torch.nn.Module:
    """A Llama of width 32 (MLP 64, 2 heads, 1 KV head), initialised from seed 0, in eval mode.

    Args:
        vocab_size: Vocabulary size.
        num_hidden_layers: Decoder layers.
        **config: Further ``LlamaConfig`` fields (e.g. ``tie_word_embeddings=True``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    conf = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        **config,
    )
    return LlamaForCausalLM(conf).eval()
