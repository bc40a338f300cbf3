"""Loading policy and critic models, and building the tiny local Qwen2 model used by tests and the CPU demo.

The tiny model is a real Qwen2 checkpoint (config.json + model.safetensors + tokenizer files), so
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer.from_pretrained` and vLLM load it like any other.
Its tokenizer is a byte-level BPE built the way Qwen2's is, because transformers 5 ignores the saved
tokenizer class of a `qwen2` checkpoint and rebuilds Qwen2's pipeline from the saved vocab and merges:
any other kind of vocab would silently lose spaces on reload.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "CHAT_TEMPLATE",
    "END_OF_TEXT",
    "IM_END",
    "IM_START",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "count_parameters",
    "enable_activation_checkpointing",
    "float32_master_weights",
    "load_critic",
    "load_policy",
    "tied_aliases",
    "train_tokenizer",
]

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
MIN_HEAD_DIM = 32  # vLLM's CPU attention rejects smaller heads
_BYTE_ALPHABET_SIZE = 256

# Qwen2's pre-tokenizer split, one alternative per line, tried in order. It must split exactly like the
# pattern transformers rebuilds when it reloads a qwen2 tokenizer (a test compares the two tokenizations).
_SPLIT_ALTERNATIVES = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",  # English contractions, any case
    r"[^\r\n\p{L}\p{N}]?\p{L}+",  # a run of letters, with at most one leading space or symbol glued on
    r"\p{N}",  # every digit on its own, so numbers never merge into opaque chunks
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # a run of symbols, with an optional leading space and trailing line breaks
    r"\s*[\r\n]+",  # whitespace that ends in line breaks
    r"\s+(?!\S)",  # a whitespace run minus its last character when non-space text follows (that space joins it)
    r"\s+",  # any remaining whitespace
)
SPLIT_PATTERN = "|".join(_SPLIT_ALTERNATIVES)

# ChatML: every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an
# assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('chat message content must be a string, got: ' ~ message['content']) -}}"
    "{%- endif -%}"
    "{{- '" + IM_START + "' ~ message['role'] ~ '\\n' ~ message['content'] ~ '" + IM_END + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + IM_START + "assistant\\n' -}}"
    "{%- endif -%}"
)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a Qwen2-style byte-level BPE tokenizer on `texts`.

    Ids 0, 1, 2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; then the 256 byte symbols; then merges,
    up to `vocab_size` tokens in all (fewer when the texts hold fewer repeated pairs). The tokenizer
    NFC-normalises its input, as Qwen2's does, and decodes any NFC text back exactly.
    `pad_token` and `eos_token` are `<|endoftext|>`; the chat template is ChatML.
    """
    corpus = _checked_texts(texts)
    _check_vocab_size(vocab_size)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    max_position_embeddings: int = 1024,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Train a tokenizer on `texts`, build a randomly initialised Qwen2ForCausalLM and save both.

    The weights are initialised in float32 and saved in `dtype` (`bfloat16`, as most published checkpoints are,
    to check what a run does with such a model).

    The checkpoint is written to a temporary directory next to `out_dir` and renamed into place, so a
    reader never sees half a model. `out_dir` may be missing, empty, or an earlier model directory (which
    is replaced); anything else is refused. The model's vocabulary is exactly the tokenizer's. The same
    texts and seed give identical vocab and weights. Returns `out_dir`.
    """
    for name, value in (
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("intermediate_size", intermediate_size),
        ("max_position_embeddings", max_position_embeddings),
    ):
        _check_positive_int(name, value)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if hidden_size // num_heads < MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim = hidden_size / num_heads = {hidden_size} / {num_heads} = {hidden_size // num_heads} "
            f"must be >= {MIN_HEAD_DIM} (vLLM's CPU attention rejects smaller heads): "
            "raise hidden_size or lower num_heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    corpus = _checked_texts(texts)
    _check_vocab_size(vocab_size)

    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    eos_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        dtype=dtype,
    )
    # A private RNG stream: building a model must not move the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)  # the same initial values whatever `dtype`
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=eos_id,
        bos_token_id=None,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint should be readable like any directory
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def load_policy(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local model directory or a hub name.

    `dtype=None` loads float32 whatever the checkpoint holds: the weights a trainer updates (see
    `float32_master_weights`); pass the compute dtype for a frozen copy. The tokenizer pads on the left (prompts
    are right-aligned for generation) and falls back to its eos token when it has no pad token.
    """
    source = _model_source(path, need_tokenizer=True)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {source} has neither a pad_token nor an eos_token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model, info = AutoModelForCausalLM.from_pretrained(
        source, output_loading_info=True, **_load_kwargs(dtype, attn_implementation)
    )
    if info["missing_keys"]:  # transformers would otherwise fill them with random values and carry on
        raise ValueError(
            f"checkpoint at {source} is not a complete causal LM (a critic checkpoint?); "
            f"missing weights: {sorted(info['missing_keys'])}"
        )
    return model.to(device), tokenizer


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (less memory, more time).

    transformers 5.24 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable` (the old name
    warns and goes in v6); older releases only have the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def load_critic(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a value model: the policy's architecture with a one-output linear head per token.

    From a causal LM checkpoint the backbone is copied and the new `score` head starts at zero, so the
    first values are all 0 and the result is deterministic. A directory that already holds a
    token-classification checkpoint (a saved critic) is loaded as it is. Dropout before the head is off.
    The model returns logits of shape [batch, seq, 1]. `dtype=None` loads float32, as `load_policy` does.
    """
    source = _model_source(path, need_tokenizer=False)
    config = AutoConfig.from_pretrained(source)
    is_saved_critic = any(arch.endswith("ForTokenClassification") for arch in config.architectures or ())
    if is_saved_critic and config.num_labels != 1:
        raise ValueError(
            f"critic checkpoint at {source} has {config.num_labels} labels per token; a value model needs exactly 1"
        )
    if not is_saved_critic:
        config = AutoConfig.from_pretrained(source, num_labels=1)
    config.classifier_dropout = 0.0  # stored with the critic, so a plain from_pretrained reload matches too

    # From a policy checkpoint transformers prints a report of the dropped lm_head and the new head; both are
    # expected and the keys are checked below, so that report is filtered out (raising the logger's level
    # instead would switch on other load-time checks in transformers).
    load_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    if not is_saved_critic:
        load_logger.addFilter(report_filter)
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            source, config=config, output_loading_info=True, **_load_kwargs(dtype, attn_implementation)
        )
    finally:
        load_logger.removeFilter(report_filter)

    # Everything missing must be the new head: a gap in the backbone means the wrong checkpoint.
    missing = sorted(info["missing_keys"])
    backbone_missing = [key for key in missing if key.startswith(model.base_model_prefix + ".")]
    if backbone_missing or (is_saved_critic and missing):
        raise ValueError(f"checkpoint at {source} does not hold the weights a critic needs; missing: {missing}")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key in missing:
            if key in parameters:  # a head buffer, if any, keeps its own initial value
                parameters[key].zero_()
    return model.to(device)


def float32_master_weights(model: PreTrainedModel | None) -> PreTrainedModel | None:
    """`model` with float32 floating-point parameters and buffers (cast in place when any parameter is not).

    A trained model keeps float32 master weights whatever dtype its checkpoint was saved in (Qwen2.5 ships
    bfloat16, and transformers' `dtype="auto"` keeps it): bfloat16 resolves relative changes of 2^-8 only, so
    AdamW steps of ~lr = 1e-6 on weights of ~1e-2 round to nothing and the run silently does not learn. Compute
    may still be bf16 (autocast, or FSDP's mixed precision). None passes through.
    """
    if model is not None and any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.to(torch.float32)
    return model


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which a parameter appears a second time (a tied `lm_head.weight`): every name of a shared
    parameter but the first in module order."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def count_parameters(model: torch.nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements in `model` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _load_kwargs(dtype: torch.dtype | None, attn_implementation: str | None) -> dict:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    # not transformers' own default ("auto": the checkpoint's dtype, bfloat16 for most published models)
    kwargs: dict = {"dtype": dtype if dtype is not None else torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def _model_source(path: str | Path, *, need_tokenizer: bool) -> str:
    """Check that `path` is a model directory (or names a hub repository) before anything heavy loads."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model path must be a str or Path, got {type(path).__name__}: {path!r}")
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise NotADirectoryError(f"model path {local} is a file; expected a directory holding config.json")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model path {local} is not a model directory: it has no config.json")
        if not any((local / name).is_file() for name in _WEIGHT_FILES):
            raise FileNotFoundError(
                f"model directory {local} holds no weights (looked for {', '.join(_WEIGHT_FILES)})"
            )
        if need_tokenizer and not any((local / name).is_file() for name in _TOKENIZER_FILES):
            raise FileNotFoundError(
                f"model directory {local} holds no tokenizer (looked for {', '.join(_TOKENIZER_FILES)})"
            )
        return str(local)
    if isinstance(path, str) and _HUB_ID.match(path):
        return path  # "org/name": transformers resolves it from the local cache or the hub
    raise FileNotFoundError(f"model path {path} does not exist")


def _checked_texts(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings, not a single string")
    corpus = list(texts)
    for row, text in enumerate(corpus):
        if not isinstance(text, str):
            raise TypeError(f"texts[{row}] must be a str, got {type(text).__name__}")
    if not any(corpus):
        raise ValueError("texts is empty: the tokenizer needs some text to learn merges from")
    return corpus


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_vocab_size(vocab_size: int) -> None:
    _check_positive_int("vocab_size", vocab_size)
    smallest = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be at least {smallest}: "
            f"{_BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens"
        )


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"out_dir {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(
            f"out_dir {out_dir} is a non-empty directory that holds no model (no config.json); "
            "refusing to replace it"
        )


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is moved aside first and deleted after."""
    if out_dir.exists() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)  # an empty directory is replaced by rename(2) itself
