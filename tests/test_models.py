import json
import subprocess
import sys

import pytest
import torch

from dwmtrain.errors import ConfigError
from dwmtrain.models.spec import PRESETS, ModelSpec


def _built_count(spec: ModelSpec) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the real HF module, without allocating memory (an 8B model included)
        model = AutoModelForCausalLM.from_config(spec.hf_config())
    return sum(p.numel() for p in model.parameters())  # a tied head is one tensor, counted once


def _tiny(model_type: str, **fields) -> ModelSpec:
    base = {
        "model_type": model_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 256,
    }
    return ModelSpec.from_fields(f"tiny-{model_type}", {**base, **fields})  # fmt: skip


@pytest.mark.parametrize(
    "preset, expected",
    [("1.3b", 1_345_423_360), ("370m", 373_867_520), ("llama3.2-1b", 1_235_814_400),
     ("llama3.2-3b", 3_212_749_824), ("llama3.1-8b", 8_030_261_248)],
)  # fmt: skip
def test_preset_parameter_counts(preset, expected):
    spec = ModelSpec.from_preset(preset)
    assert spec.num_parameters() == expected == _built_count(spec)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("kv_heads, tied, extra", [(4, False, {}), (1, False, {}), (2, True, {"head_dim": 32})])
def test_the_parameter_formula_counts_gqa_tied_embeddings_and_each_architecture(model_type, kv_heads, tied, extra):
    spec = _tiny(model_type, num_key_value_heads=kv_heads, tie_word_embeddings=tied, **extra)
    assert spec.num_parameters() == _built_count(spec)
    if model_type == "llama":
        biased = _tiny(model_type, attention_bias=True, mlp_bias=True, num_key_value_heads=kv_heads)
        assert biased.num_parameters() == _built_count(biased) > spec.num_parameters()


def test_a_spec_keeps_the_preset_shape_and_takes_the_run_vocabulary_and_context():
    spec = ModelSpec.from_preset("370m", vocab_size=4096, max_seq_len=2048)
    cfg = spec.hf_config("eager")
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size) == (4096, 2048, 1024)
    assert cfg._attn_implementation == "dwmtrain_eager" and not cfg.tie_word_embeddings
    assert ModelSpec.from_preset("370m").vocab_size == 32000
    llama3 = ModelSpec.from_preset("llama3.2-1b").hf_config()
    assert llama3.tie_word_embeddings and llama3.num_key_value_heads == 8
    assert (llama3.rope_parameters or {}).get("rope_theta", getattr(llama3, "rope_theta", None)) == 500000.0


def test_a_hugging_face_config_file_is_a_spec_and_an_unsupported_one_is_refused_by_name(tmp_path):
    cfg = ModelSpec.from_preset("llama3.2-1b").hf_config()
    cfg.architectures, cfg.torch_dtype = ["LlamaForCausalLM"], "bfloat16"  # bookkeeping, not the model
    cfg.save_pretrained(tmp_path / "llama")
    spec = ModelSpec.from_hf_config(tmp_path / "llama", max_seq_len=4096)  # Llama 3's scaled rope keeps its context
    assert spec.num_parameters() == 1_235_814_400 and spec.max_position_embeddings == 131072
    assert spec.shape() == ModelSpec.from_preset("llama3.2-1b").shape()
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ConfigError, match=r"architecture 'gpt2' is not supported \(supported: llama"):
        ModelSpec.from_hf_config(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="model.hf_config=.*not found"):
        ModelSpec.from_hf_config(tmp_path / "nothing")
    assert set(PRESETS) >= {"tiny", "small", "370m", "1.3b", "llama3.2-1b", "llama3.2-3b", "llama3.1-8b"}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_the_fused_loss_equals_the_logits_path_for_each_architecture_tied_and_gqa(model_type):
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.loss import per_sample_loss, weighted_loss

    m = build_lm(_tiny(model_type, num_key_value_heads=2, tie_word_embeddings=True), seed=0).double()
    x, w = torch.randint(0, 512, (4, 32)), torch.rand(4, dtype=torch.float64) * 2
    ref = weighted_loss(per_sample_loss(m(input_ids=x).logits, x), w)
    m.loss_chunk_tokens = 16
    loss, _ = m(input_ids=x, sample_weights=w)
    params = list(m.parameters())
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    for a, b in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_describe_model_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dwmtrain", "describe-model", "1.3b"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "parameters: 1345423360" in out.splitlines()


def test_tiny_forward_backward():
    from dwmtrain.models.lm import build_lm

    m = build_lm(ModelSpec.from_preset("tiny"), seed=0)
    x = torch.randint(0, 512, (2, 16))
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
