"""``dwmtrain fit-dwm``: a DWM fitted on any Hugging Face checkpoint, outside a dwmtrain run, through the public
``dwmtrain.meta_update`` (registered on the main parser by ``register(sub)``; free of heavy imports)."""

from __future__ import annotations


def _fit(a) -> None:
    import torch

    from dwmtrain.analysis.preferences import open_split
    from dwmtrain.api import TokenizerId, meta_update
    from dwmtrain.config.schema import MetaConfig
    from dwmtrain.errors import DWMInputError

    if a.micro_batch < 1 or a.steps < 1:
        raise DWMInputError(f"--micro-batch={a.micro_batch}, --steps={a.steps}: both must be >= 1")
    train, reward = open_split(a.data, "train", " (--data)"), open_split(a.reward, a.reward_split, " (--reward)")
    if train.index.get("tokenizer_sha256") != reward.index.get("tokenizer_sha256"):
        raise DWMInputError(f"--reward {a.reward}: tokenized with {reward.index.get('tokenizer')}, --data {a.data} "
                            f"with {train.index.get('tokenizer')}: one tokenizer for both")  # fmt: skip
    g = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(train), generator=g).tolist()
    mb = a.micro_batch
    batches = [train.batch(order[i : i + mb]) for i in range(0, min(len(order), a.steps * mb) - mb + 1, mb)]
    ids = list(range(min(len(reward), a.reward_examples)))
    reward_ids = reward.batch(ids) if ids else []  # none: meta_update refuses the empty set, naming it
    meta = MetaConfig(steps=a.steps, lr=a.lr, lookahead_lr=a.lookahead_lr, grad_mode=a.grad_mode)
    # the data's own record of its tokenizer (its sha256): the tokenizer file need not be where it was
    tok = TokenizerId(train.index.get("tokenizer"), train.index.get("tokenizer_sha256"), train.vocab_size)
    dwm = meta_update(a.model, batches, reward_ids, dwm=a.dwm, meta=meta, tokenizer=tok, out=a.out, seed=a.seed)
    print(f"fitted stage {dwm.stage}'s DWM on {a.model}: {a.steps} meta-steps on micro-batches of {mb} from {a.data}, "
          f"reward {len(reward_ids)} {a.reward_split} examples of {a.reward} -> {a.out}")  # fmt: skip


def register(sub) -> None:
    """Add ``fit-dwm`` to the subparsers ``sub`` of the ``dwmtrain`` parser."""
    p = sub.add_parser(
        "fit-dwm",
        help="fit a DWM on a Hugging Face checkpoint by the bi-level objective (dwmtrain.meta_update), outside a run",
        description="The meta-update of a stage boundary on any Llama-family checkpoint directory: micro-batches of "
        "--data's train split, the reward set of --reward's held-out split (the target: keep it apart from what "
        "you report). The DWM file is what a dwmtrain run (meta.mode=fixed) and dwmtrain.DWM read.",
    )
    p.add_argument("--model", required=True, help="a Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--data", required=True, help="a `dwmtrain prepare-data` directory: training micro-batches")
    p.add_argument("--reward", required=True, help="a `dwmtrain prepare-data` directory: the reward set")
    p.add_argument("--reward-split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--reward-examples", type=int, default=256)
    p.add_argument("--lookahead-lr", type=float, required=True, help="alpha: the LM's learning rate at this point")
    p.add_argument("--dwm", default=None, help="the previous stage's DWM file, to continue (default: a fresh one)")
    p.add_argument("--steps", type=int, default=20, help="meta-steps")
    p.add_argument("--lr", type=float, default=1e-4, help="the DWM's Adam learning rate")
    p.add_argument("--grad-mode", default="fd", choices=("fd", "per_sample", "jvp"))
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the DWM file to write (FILE.safetensors and its .json)")
    p.set_defaults(fn=_fit)
