import subprocess
import sys

import pytest
import torch

from dwmtrain.models.lm import PRESETS, count_parameters, llama_config


@pytest.mark.parametrize("preset, expected", [("1.3b", 1_345_423_360), ("370m", 373_867_520)])
def test_paper_parameter_counts(preset, expected):
    assert count_parameters(preset) == expected
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # the real HF module, without allocating memory
        model = LlamaForCausalLM(llama_config(preset))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_table7_shapes():
    assert PRESETS["370m"].hidden_size == 1024 and PRESETS["370m"].num_hidden_layers == 24
    assert PRESETS["1.3b"].intermediate_size == 5504 and PRESETS["1.3b"].num_attention_heads == 16
    assert all(PRESETS[p].vocab_size == 32000 and PRESETS[p].max_position_embeddings == 1024 for p in ("370m", "1.3b"))


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

    m = build_lm("tiny", seed=0)
    x = torch.randint(0, 512, (2, 16))
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
