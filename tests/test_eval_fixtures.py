"""Shared helpers of the eval tests: a deterministic corpus, a real (tiny, trained here) BPE
tokenizer and a tiny random Llama. Nothing is downloaded; everything is cached per session.

This module holds no tests; the other ``test_eval_*`` modules import its functions.
"""

from __future__ import annotations

import copy
import functools
import random

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_SUBJECTS = [
    "The old miller",
    "A young painter",
    "The harbor master",
    "Our neighbor",
    "The teacher",
    "A tired sailor",
]
_VERBS = ["walked along", "painted", "watched", "remembered", "crossed", "described"]
_OBJECTS = ["the quiet river", "the northern hills", "a wooden bridge", "the empty market", "the long road"]
_TAILS = ["before dawn", "in the autumn rain", "with great care", "after the storm", "every summer"]


@functools.cache
def corpus_text(n_sentences: int = 1500, seed: int = 0) -> str:
    """Plain English-like text: paragraphs of six simple sentences, deterministic for the seed."""
    rng = random.Random(seed)
    sentences = [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        for _ in range(n_sentences)
    ]
    return "\n\n".join(" ".join(sentences[i : i + 6]) for i in range(0, n_sentences, 6))


@functools.cache
def _base_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_tokenizer(chat_template: bool = False):
    """A byte-level BPE tokenizer (vocab 500) trained on :func:`corpus_text`; a fresh copy."""
    tokenizer = copy.deepcopy(_base_tokenizer())
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0, attn_implementation: str = "sdpa"):
    """A random 2-layer Llama (hidden 32, 4 query / 2 KV heads) in float32 eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def make_saved_kernel_llama(folder, seed: int = 0):
    """A random 2-layer Llama with kernel-sized heads (head_dim 64, 4 query / 2 KV heads) and the
    :func:`make_tokenizer` tokenizer, both saved to ``folder``; returns ``(model, tokenizer)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
