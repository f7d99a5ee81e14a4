"""A DWM in a plain PyTorch loop (the lines to copy into a torchtitan, Lightning or own loop are marked ##).

    python examples/plain_loop.py --data DIR --tokenizer TOK [--dwm FILE] [--steps 12] [--boundary 6] [--out DIR]

DIR is a `dwmtrain prepare-data` directory (any [B, T] token ids do). Stage 1 weighs uniformly (or by --dwm); after
--boundary steps the DWM is fitted on the model and optimizer as they are, against the reward half of the held-out
split; the other half is what the loss is reported on (the reward set never overlaps it).
"""

import argparse
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dwmtrain import DWM, MetaConfig, meta_update, weighted_lm_loss
from dwmtrain.data.dataset import TokenDataset

ap = argparse.ArgumentParser()
for flag, default in (("--data", None), ("--tokenizer", None), ("--dwm", None), ("--out", "runs/plain_loop")):
    ap.add_argument(flag, default=default, required=default is None and flag != "--dwm")
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--boundary", type=int, default=6)
a = ap.parse_args()
train, heldout = TokenDataset(a.data, "train"), TokenDataset(a.data, "heldout")
torch.manual_seed(0)
model = LlamaForCausalLM(
    LlamaConfig(
        vocab_size=train.vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=train.seq_len,
    )
)
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
B = 8
reward = heldout.batch(list(range(0, 32)))  # the target the DWM serves ...
report = heldout.batch(list(range(32, 64)))  # ... and what the loss is reported on: disjoint
dwm = DWM.load(a.dwm, tokenizer=a.tokenizer) if a.dwm else None  ## None: stage 1, uniform

for step in range(a.steps):
    x = train.batch(list(range(step * B, (step + 1) * B)))
    w = dwm(x) if dwm is not None else torch.ones(B)  ## weights [B], mean 1
    loss, losses = weighted_lm_loss(model, x, w)  ## mean_i w_i L_i
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step + 1 == a.boundary:  ## a stage boundary: fit the next stage's DWM from this model and optimizer
        micro_batches = [train.batch(list(range(i * B, (i + 1) * B))) for i in range(100, 104)]
        dwm = meta_update(
            model,
            micro_batches,
            reward,
            dwm=dwm,
            optimizer=opt,
            meta=MetaConfig(steps=4),
            tokenizer=a.tokenizer,
            out=f"{a.out}/stage2.safetensors",
            lm_step=step + 1,
        )
    with torch.no_grad():
        val = weighted_lm_loss(model, report, torch.ones(len(report)))[0].item()
    print(
        json.dumps(
            {
                "step": step + 1,
                "loss": round(loss.item(), 4),
                "w_max": round(w.max().item(), 4),
                "report_loss": round(val, 4),
            }
        ),
        flush=True,
    )
