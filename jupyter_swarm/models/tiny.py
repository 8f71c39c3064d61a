"""Tiny random models with a locally trained tokenizer, for tests, demos and benchmarks without downloads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, BloomConfig, LlamaConfig, MistralConfig, PreTrainedConfig,
                          PreTrainedTokenizerFast, Qwen2Config)
from transformers.utils import logging as hf_logging

from jupyter_swarm.errors import ConfigurationError

MARKER = "jupyter_swarm_tiny.json"
MARKER_VERSION = 1
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
DEFAULT_VOCAB_SIZE = 512
MAX_POSITIONS = 2048
INITIALIZER_RANGE = 0.2  # larger than usual, so that attention patterns and positions matter in tests

TRAINING_TEXT = """\
Once upon a time there was a little model that lived in a notebook. Every morning it woke up, read a few words,
and tried to guess the next one. Most of the time it was wrong, but it never stopped trying.
The model was too large for one computer, so it was split into blocks, and each block lived on a different server.
A client held the embeddings and the head; the servers held the blocks in between. Together they formed a swarm.
When the client asked a question, the hidden states travelled from server to server, and the answer came back.
If a server went away, the client found another route through the swarm and replayed what it had sent before.
The quick brown fox jumps over the lazy dog. The cat sat on the mat, and the dog slept by the warm fire.
She sells sea shells by the sea shore. Peter Piper picked a peck of pickled peppers.
It was the best of times, it was the worst of times. All happy families are alike.
In the beginning, the notebook was empty. Then someone typed a cell, pressed shift and enter, and waited.
The numbers one, two, three, four, five, six, seven, eight, nine and ten are written here for counting.
Hello world! How are you today? I am fine, thank you. What is your name? My name is Swarm.
"""

_CONFIG_CLASSES: dict[str, type[PreTrainedConfig]] = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "bloom": BloomConfig}


def make_tiny_model(path: str, *, family: str = "llama", seed: int = 0, hidden_size: int = 64, num_layers: int = 4,
                    num_heads: int = 4, num_kv_heads: int = 2, vocab_size: int | None = None,
                    intermediate_size: int | None = None, tie_word_embeddings: bool = False,
                    shard_size: str | None = None, dtype: torch.dtype = torch.float32,
                    config_overrides: dict[str, Any] | None = None) -> str:
    """Create (or reuse) a tiny random causal LM with its own tokenizer in directory ``path``; return ``path``.

    The weights come from transformers' own initialisation under ``torch.manual_seed(seed)``, so the same
    arguments give the same model. The tokenizer is a byte-level BPE trained on a built-in English text, saved
    so that ``AutoTokenizer.from_pretrained(path)`` works offline (special tokens ``<unk> <s> </s> <pad>``).

    Args:
        family: "llama", "mistral", "qwen2" or "bloom" (BLOOM ignores ``num_kv_heads`` and ``intermediate_size``).
        vocab_size: None to use the tokenizer's size; otherwise the tokenizer is trained to at most this size
            and the embedding matrix has exactly this many rows.
        intermediate_size: MLP width of Llama-shaped models (default ``2 * hidden_size``).
        shard_size: e.g. "50KB" to save a sharded checkpoint (``model.safetensors.index.json``).
        dtype: of the saved weights.
        config_overrides: extra config fields, e.g. ``{"sliding_window": 8}`` for Mistral.

    If ``path`` already holds a tiny model made with the same arguments, it is returned as is. A non-empty
    directory that was not made by this function is never overwritten.
    """
    if family not in _CONFIG_CLASSES:
        raise ConfigurationError(f"unknown tiny model family {family!r}; choose one of {', '.join(_CONFIG_CLASSES)}")
    args = {
        "version": MARKER_VERSION, "family": family, "seed": seed, "hidden_size": hidden_size,
        "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "vocab_size": vocab_size,
        "intermediate_size": intermediate_size, "tie_word_embeddings": tie_word_embeddings,
        "shard_size": shard_size, "dtype": str(dtype), "config_overrides": config_overrides or {},
    }
    args = json.loads(json.dumps(args, sort_keys=True, default=str))
    path = os.path.abspath(os.path.expanduser(path))
    if _made_with(path, args):
        return path
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, MARKER)):
        raise ConfigurationError(
            f"{path} is a non-empty directory not made by make_tiny_model; refusing to overwrite it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    build_dir = tempfile.mkdtemp(prefix=".tiny-build-", dir=parent)
    try:
        _build(build_dir, args, dtype)
        with open(os.path.join(build_dir, MARKER), "w", encoding="utf-8") as f:
            json.dump(args, f, indent=1, sort_keys=True)
        _install(build_dir, path, args)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return path


def _made_with(path: str, args: dict[str, Any]) -> bool:
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            return json.load(f) == args
    except (OSError, ValueError):
        return False


def _install(build_dir: str, path: str, args: dict[str, Any]) -> None:
    """Move the finished model into place, so other processes never see a half-written one."""
    old = None
    if os.path.exists(path):
        if _made_with(path, args):  # another process finished first
            return
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    try:
        os.rename(build_dir, path)
    except OSError:
        if not _made_with(path, args):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(directory: str, args: dict[str, Any], dtype: torch.dtype) -> None:
    tokenizer = _train_tokenizer(args["vocab_size"] or DEFAULT_VOCAB_SIZE)
    token_count = tokenizer.get_vocab_size()
    vocab_size = args["vocab_size"] or token_count
    if token_count > vocab_size:
        raise ConfigurationError(f"vocab_size={vocab_size} is too small for the tiny tokenizer ({token_count} tokens)")
    config = _make_config(args, vocab_size)
    torch.manual_seed(args["seed"])
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.config.dtype = dtype
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        extra = {"max_shard_size": args["shard_size"]} if args["shard_size"] else {}
        model.save_pretrained(directory, **extra)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[3], model_max_length=MAX_POSITIONS)
    wrapped.save_pretrained(directory)


def _make_config(args: dict[str, Any], vocab_size: int) -> PreTrainedConfig:
    common = dict(vocab_size=vocab_size, hidden_size=args["hidden_size"], num_attention_heads=args["num_heads"],
                  num_hidden_layers=args["num_layers"], tie_word_embeddings=args["tie_word_embeddings"],
                  initializer_range=INITIALIZER_RANGE, unk_token_id=0, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3)
    if args["family"] == "bloom":
        common["n_head"] = common.pop("num_attention_heads")
        common["n_layer"] = common.pop("num_hidden_layers")
    else:
        common.update(num_key_value_heads=args["num_kv_heads"], max_position_embeddings=MAX_POSITIONS,
                      intermediate_size=args["intermediate_size"] or 2 * args["hidden_size"])
    common.update(args["config_overrides"])
    return _CONFIG_CLASSES[args["family"]](**common)


def _train_tokenizer(max_vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on TRAINING_TEXT with at most ``max_vocab_size`` tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    full_alphabet = max_vocab_size >= 256 + len(SPECIAL_TOKENS) + 32  # room for every byte and some merges
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    return tokenizer
