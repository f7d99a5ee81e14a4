#!/usr/bin/env python3
"""Side-by-side timings in one process: LM step with vs without the DWM, and the meta-step per mode.

Prints ratios measured in the same run (same process, same inputs, interleaved repetitions):
  * DWM overhead: (LM step + DWM forward) / LM step, against the paper's Eq. 9 estimate 2*P_w / 6*P
  * meta-step cost of each meta-gradient mode relative to one LM training step
On CUDA also tokens/s, MFU and peak memory.

    python tools/bench.py --preset small --dwm-backbone small --seq-len 128 --reps 5
    python tools/bench.py --preset 1.3b --dwm-backbone 370m --seq-len 1024 --dtype bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dwmtrain.meta.metagrad import dwm_surrogate, lm_params, meta_gradient  # noqa: E402
from dwmtrain.models.dwm import DataWeightingModel, DWMArch  # noqa: E402
from dwmtrain.models.lm import build_lm, count_parameters  # noqa: E402
from dwmtrain.train.loss import per_sample_loss, weighted_loss  # noqa: E402
from dwmtrain.train.metrics import peak_flops  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev, reps):
    out = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--dwm-backbone", default="")
    ap.add_argument("--vocab-size", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--modes", default="fd,per_sample", help="meta-gradient modes to time")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)
    lm = build_lm(a.preset, a.vocab_size, a.seq_len, seed=0).to(dev, dt)
    V = lm.config.vocab_size
    arch = DWMArch(a.dwm_backbone or a.preset, V, a.seq_len)
    dwm = DataWeightingModel(arch).to(dev, dt).eval().requires_grad_(False)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randint(0, V, (a.micro, a.seq_len), device=dev)
    P, Pw = count_parameters(a.preset, V), sum(p.numel() for p in dwm.parameters())

    def lm_step(w=None):
        losses = per_sample_loss(lm(input_ids=x).logits, x)
        weighted_loss(losses, torch.ones(a.micro, device=dev) if w is None else w).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def lm_step_dwm():
        with torch.no_grad():
            w = dwm(x).float()
        lm_step(w)

    for f in (lm_step, lm_step_dwm):  # warm-up
        f()
    base, with_dwm = [], []
    for _ in range(a.reps):  # interleaved so drifts hit both alike
        base.append(timeit(lm_step, dev, 1))
        with_dwm.append(timeit(lm_step_dwm, dev, 1))
    t0, t1 = statistics.median(base), statistics.median(with_dwm)
    tokens = a.micro * a.seq_len
    print(
        f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), dtype {a.dtype}, "
        f"LM {a.preset} ({P:,} params), DWM backbone {arch.backbone} ({Pw:,} params), micro-batch "
        f"{a.micro} x {a.seq_len}"
    )
    print(f"LM step (uniform weights):      {t0 * 1e3:9.1f} ms   {tokens / t0:10.0f} tokens/s")
    print(f"LM step + DWM forward:          {t1 * 1e3:9.1f} ms   {tokens / t1:10.0f} tokens/s")
    print(
        f"DWM overhead measured:          {100 * (t1 / t0 - 1):9.1f} %   (Eq. 9 estimate 2P_w/6P = "
        f"{100 * Pw / (3 * P):.1f} %)"
    )
    peak = peak_flops(torch.cuda.get_device_name()) if dev.type == "cuda" else None
    if peak:
        print(f"MFU (6N, LM step alone):        {100 * 6 * P * tokens / t0 / peak:9.1f} %")
        print(f"peak memory:                    {torch.cuda.max_memory_allocated() / 2**30:9.2f} GiB")

    lm.eval().requires_grad_(False)
    params = lm_params(lm)
    vb = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    mdwm = DataWeightingModel(arch).to(dev, dt).train()
    for mode in a.modes.split(","):

        def meta_step(mode=mode):
            w = mdwm(x)
            g = meta_gradient(lm, params, x, vb, w.detach().float(), 1e-3, mode)
            dwm_surrogate(w, g.dR_dw).backward()
            mdwm.zero_grad(set_to_none=True)

        meta_step()
        tm = timeit(meta_step, dev, a.reps)
        print(f"meta-step, mode {mode:<11}     {tm * 1e3:9.1f} ms   = {tm / t0:5.2f} x one LM step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
