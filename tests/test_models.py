import dataclasses
import subprocess
import sys

import pytest
import torch

from dwmtrain.models.spec import PRESETS, ModelSpec


def _built_count(spec: ModelSpec) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # the real HF module, without allocating memory
        model = LlamaForCausalLM(spec.hf_config())
    return sum(p.numel() for p in model.parameters())  # a tied head is one tensor, counted once


@pytest.mark.parametrize("preset, expected", [("1.3b", 1_345_423_360), ("370m", 373_867_520)])
def test_paper_parameter_counts(preset, expected):
    spec = ModelSpec.from_preset(preset)
    assert spec.num_parameters() == expected == _built_count(spec)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("kv_heads, tied", [(None, False), (1, False), (2, True)])
def test_the_parameter_formula_counts_gqa_and_tied_embeddings(preset, kv_heads, tied):
    spec = ModelSpec.from_preset(preset)
    spec = dataclasses.replace(spec, num_key_value_heads=kv_heads or spec.num_key_value_heads, tie_word_embeddings=tied)
    assert spec.num_parameters() == _built_count(spec)


def test_a_spec_keeps_the_preset_shape_and_takes_the_run_vocabulary_and_context():
    spec = ModelSpec.from_preset("370m", vocab_size=4096, max_seq_len=2048)
    cfg = spec.hf_config("eager")
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size) == (4096, 2048, 1024)
    assert cfg._attn_implementation == "dwmtrain_eager" and not cfg.tie_word_embeddings
    assert ModelSpec.from_preset("370m").vocab_size == 32000


def test_describe_model_cli():
    out = subprocess.run(
        [sys.executable, "-m", "dwmtrain.cli", "describe-model", "1.3b"],
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
