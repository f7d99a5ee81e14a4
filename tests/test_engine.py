"""Building the LM under DeepSpeed's zero.Init on 2 real gloo ranks (spawned)."""

from __future__ import annotations

import torch

from .spawn import run_distributed


def _partitioned_build(d):
    import deepspeed

    from dwmtrain.config import build_deepspeed_config, load_config
    from dwmtrain.models.spec import ModelSpec
    from dwmtrain.train.engine import build_partitioned_lm

    deepspeed.init_distributed()  # adopts the spawned gloo group, as setup's init_distributed does
    cfg = load_config("tiny", ["data.seq_len=32", "deepspeed.global_batch_size=16", "run.seed=5"])
    torch.manual_seed(100 + d.rank)  # whatever state the ranks are in: the build seeds itself
    spec = ModelSpec.from_preset("tiny", 512, 0)
    lm = build_partitioned_lm(
        spec, cfg.model.attn_implementation, cfg.run.seed, build_deepspeed_config(cfg, d.world, "cpu")
    )
    rng_after = torch.get_rng_state()
    held = sum(p.ds_tensor.numel() for p in lm.parameters())  # what this rank stores between gathers
    full = {}
    for n, p in lm.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            full[n] = p.data.clone()
    return full, held, rng_after


def test_partitioned_build_has_the_plain_seeded_weights_and_rng_on_every_rank():
    """zero.Init build: each rank holds about half the LM, the gathered weights equal a plain seeded build
    bit for bit, and every rank's RNG continues as after that build."""
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    torch.manual_seed(5)
    plain = build_lm(ModelSpec.from_preset("tiny", 512, 32), seed=5)
    rng_plain = torch.get_rng_state()
    total = sum(p.numel() for p in plain.parameters())
    for full, held, rng in run_distributed(_partitioned_build, timeout=240):
        assert set(full) == {n for n, _ in plain.named_parameters()}
        for n, p in plain.named_parameters():
            assert torch.equal(full[n], p.data), n
        assert held < 0.51 * total, (held, total)
        assert torch.equal(rng, rng_plain)
