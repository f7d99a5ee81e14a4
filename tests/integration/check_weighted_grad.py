"""Run under `deepspeed --num_gpus 2`: ZeRO-3 gradients of the weighted loss (the fused, chunked LM-head path, its
head weight gathered inside the engine's forward) == a hand-computed weighted sum of per-sample gradients.

Also: permuting a micro-batch permutes its DWM weights; a fresh DWM gives uniform weights.
``--tied``: a Llama-3-style tiny LM (grouped-query attention 4/2, the head tied to the embedding), the known trap of
a tied head under ZeRO-3: the shared parameter's gradient is the sum of both uses.
Prints CHECK-OK on success (rank 0), raises otherwise.
"""

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

from dwmtrain.config import build_deepspeed_config, load_config  # noqa: E402
from dwmtrain.distributed import init_distributed  # noqa: E402
from dwmtrain.models.dwm import DataWeightingModel, DWMArch  # noqa: E402
from dwmtrain.models.lm import build_lm  # noqa: E402
from dwmtrain.models.loss import per_sample_loss, weighted_loss  # noqa: E402
from dwmtrain.models.spec import ModelSpec  # noqa: E402
from dwmtrain.stages.weighting import FrozenDWM  # noqa: E402


def main():
    d = init_distributed(600)
    torch.set_num_threads(1)
    cfg = load_config(None, ["data.seq_len=32", "deepspeed.global_batch_size=16", "optimizer.grad_clip=0"])
    spec = ModelSpec.from_preset("tiny")
    if "--tied" in sys.argv:
        spec = ModelSpec.from_fields(
            "tiny-tied", {**spec.config, "num_key_value_heads": 2, "tie_word_embeddings": True}
        )
    lm = build_lm(spec, seed=0)
    ref = copy.deepcopy(lm)
    eng, *_ = deepspeed.initialize(
        model=lm, model_parameters=lm.parameters(), config=build_deepspeed_config(cfg, d.world, d.accelerator)
    )

    arch = DWMArch("tiny", 512, 32)
    fresh = DataWeightingModel(arch).eval()
    g = torch.Generator().manual_seed(100 + d.rank)
    x = torch.randint(0, 512, (8, 32), generator=g)
    assert torch.equal(FrozenDWM(fresh, {})(x, []), torch.ones(8)), "fresh DWM must give exactly uniform weights"

    torch.manual_seed(7)  # same DWM on every rank
    dwm = DataWeightingModel(arch).eval()
    torch.nn.init.normal_(dwm.fc2.weight, std=2.0)
    w = FrozenDWM(dwm, {})(x, [])
    assert w.std() > 0.05 and abs(w.mean().item() - 1) < 1e-5, w
    perm = torch.randperm(8, generator=g)
    assert torch.allclose(FrozenDWM(dwm, {})(x[perm], []), w[perm], atol=1e-5), (
        "permuting the batch must permute the weights"
    )

    full_path = weighted_loss(per_sample_loss(eng(input_ids=x).logits, x), w).detach()  # the logits path
    eng.module.loss_chunk_tokens = 64  # 8 x 31 scored tokens: four chunks
    loss, per = eng(input_ids=x, sample_weights=w)  # the fused, chunked path the training loop takes
    assert torch.allclose(loss.detach(), full_path, rtol=1e-5), (loss, full_path)
    eng.backward(loss)

    # hand-computed: (1/world) sum_r (1/B) sum_i w_ri * grad L_ri, from per-sample backward passes
    xs = [torch.empty_like(x) for _ in range(d.world)]
    ws = [torch.empty_like(w) for _ in range(d.world)]
    dist.all_gather(xs, x)
    dist.all_gather(ws, w)
    want = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    total = torch.zeros(())
    for xr, wr in zip(xs, ws):
        for i in range(8):
            ref.zero_grad()
            li = per_sample_loss(ref(input_ids=xr[i : i + 1]).logits, xr[i : i + 1])[0]
            li.backward()
            total += wr[i] * li.detach() / (8 * d.world)
            for n, p in ref.named_parameters():
                want[n] += wr[i] * p.grad / (8 * d.world)
    got_loss = loss.detach().clone()
    dist.all_reduce(got_loss)
    assert torch.allclose(got_loss / d.world, total, rtol=1e-5), (got_loss / d.world, total)
    worst = 0.0
    for n, p in eng.module.named_parameters():
        full = safe_get_full_grad(p)
        err = ((full - want[n]).norm() / want[n].norm().clamp_min(1e-12)).item()
        worst = max(worst, err)
        assert err < 1e-4, (n, err)
    assert not spec.tie_word_embeddings or eng.module.lm_head.weight is eng.module.model.embed_tokens.weight
    if d.is_main:
        print(f"CHECK-OK worst relative gradient error {worst:.2e} over {len(want)} tensors", flush=True)


if __name__ == "__main__":
    from dwmtrain.entry import main_entry, run_main

    main_entry(lambda: run_main("check_weighted_grad:", main))  # leaves the group together, ends as every rank does
