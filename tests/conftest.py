"""Tiny backbones and a tiny tokenizer built locally: nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, MistralConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config
from transformers.dynamic_module_utils import get_relative_import_files

import comi_hf
from comi_hf import COMIConfig, COMIForConditionalGeneration

PACKAGE = Path(comi_hf.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
# The environment of the scripts and commands the tests run: offline, and quiet tokenizers (they
# warn when a process forks after using them).
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
# What tests and benchmarks share and users do not (servers that die with their starter, the memory
# meter) lives beside the benchmarks, out of the wheel.
sys.path.insert(0, str(REPO / "bench"))
# The Hub's remote code: the model file and what it imports, found as transformers finds them
# (what `save_pretrained` copies).
REMOTE_CODE_FILES = tuple(
    sorted({"modeling_comi.py"} | {Path(path).name for path in get_relative_import_files(PACKAGE / "modeling_comi.py")})
)

VOCAB_SIZE = 320
EOS_ID, PAD_ID = 0, 1
FAMILIES = ("qwen2", "qwen3", "llama", "mistral")

_WORDS = (
    "the code of red river blue lake green hill stone bridge old mill is was what which "
    "answer question document fact number city north south east west 0 1 2 3 4 5 6 7 8 9 . ? ,"
).split()
# Qwen2's pre-tokenizer split pattern: a byte-level BPE laid out like Qwen2's loads unchanged
# whichever tokenizer class transformers picks for the backbone's model type.
_SPLIT = Regex(
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
)


def run_command(command: list[str], cwd, *, check: bool = True, timeout: float = 900, env: dict | None = None):
    """Run a script or command as a user would (offline, `ENV`); with `check`, it must succeed."""
    done = subprocess.run(command, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    """`examples/make_tiny_backbone.py`'s tiny Llama, as the README's training commands make it."""
    directory = tmp_path_factory.mktemp("backbone")
    run_command([sys.executable, str(EXAMPLES / "make_tiny_backbone.py"), str(directory)], directory)
    return directory


def backbone_config(family: str = "qwen2", **overrides):
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(family)


def tiny_comi(
    family: str = "qwen2", seed: int = 0, backbone: dict | None = None, **config
) -> COMIForConditionalGeneration:
    torch.manual_seed(seed)
    settings = dict(encoder_layers=2, merge_size=4, segment_size=64)
    settings.update(config)
    model = COMIForConditionalGeneration(
        COMIConfig(text_config=backbone_config(family, **(backbone or {})), **settings)
    )
    return model.eval()


def random_batch(batch_size=3, context_len=50, query_len=6, seed=0, padding_side="right"):
    """Token ids with per-sample lengths; padding on the given side (or 'mixed')."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB_SIZE, (batch_size, context_len), generator=generator)
    query_ids = torch.randint(2, VOCAB_SIZE, (batch_size, query_len), generator=generator)
    attention_mask = torch.zeros(batch_size, context_len, dtype=torch.long)
    query_mask = torch.zeros(batch_size, query_len, dtype=torch.long)
    for i in range(batch_size):
        n = context_len - 7 * i
        q = query_len - i % 3
        left = padding_side == "left" or (padding_side == "mixed" and i % 2)
        if left:
            attention_mask[i, context_len - n :] = 1
            query_mask[i, query_len - q :] = 1
        else:
            attention_mask[i, :n] = 1
            query_mask[i, :q] = 1
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    query_ids = query_ids.masked_fill(query_mask == 0, PAD_ID)
    return input_ids, attention_mask, query_ids, query_mask


def sample(batch, i):
    """Sample i of a batch from `random_batch`, without padding."""
    input_ids, attention_mask, query_ids, query_mask = batch
    return (
        input_ids[i : i + 1, attention_mask[i].bool()],
        None,
        query_ids[i : i + 1, query_mask[i].bool()],
        None,
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a small vocabulary, laid out like Qwen2's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_SPLIT, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(_WORDS[i:] + _WORDS[:i]) for i in range(len(_WORDS))] * 4
    tok.train_from_iterator(corpus, trainer)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
