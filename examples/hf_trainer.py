"""A Hugging Face Trainer with a DWM: `DWMTrainer` weighs each micro-batch and refits the DWM at stage boundaries.

    torchrun --nproc_per_node 2 examples/hf_trainer.py --data DIR --tokenizer TOK --out OUT [--max-steps 8]
        [--boundaries 3,6] [--save-steps 4] [--dwm FILE] [--resume CHECKPOINT|last] [--model-dir HF_DIR]

DIR is a `dwmtrain prepare-data` directory; the reward set is the first half of its held-out split (the second half
is left for reporting). Runs on CPU (gloo) or GPUs alike.
"""

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from dwmtrain import DWMTrainer, MetaConfig
from dwmtrain.data.dataset import TokenDataset


class Sequences(torch.utils.data.Dataset):
    """Packed sequences as the Trainer's examples: input_ids, and labels the same ids (the model shifts them)."""

    def __init__(self, path: str, split: str):
        self.ds = TokenDataset(path, split)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x = self.ds[i].long()
        return {"input_ids": x, "labels": x}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--boundaries", default="3,6", help="optimizer steps (or fractions) after which the DWM is refit")
    ap.add_argument("--save-steps", type=int, default=4)
    ap.add_argument("--dwm", default=None, help="a DWM file to weigh with from step 0 (e.g. a dwmtrain run's)")
    ap.add_argument("--resume", default=None, help="a checkpoint directory, or 'last'")
    ap.add_argument("--model-dir", default=None, help="start from this Hugging Face model directory")
    a = ap.parse_args()
    train = Sequences(a.data, "train")
    heldout = TokenDataset(a.data, "heldout")
    reward = heldout.batch(list(range(len(heldout) // 2)))  # the reward half; the other half is for reporting
    torch.manual_seed(0)
    if a.model_dir:
        model = LlamaForCausalLM.from_pretrained(a.model_dir, use_safetensors=True)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=train.ds.vocab_size, hidden_size=64, intermediate_size=176,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             max_position_embeddings=train.ds.seq_len))  # fmt: skip
    args = TrainingArguments(output_dir=a.out, max_steps=a.max_steps, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, save_steps=a.save_steps,
                             use_cpu=not torch.cuda.is_available(), report_to=[], seed=0, dataloader_drop_last=True,
                             ddp_find_unused_parameters=False)  # fmt: skip
    bounds = [float(b) if "." in b else int(b) for b in a.boundaries.split(",") if b]
    trainer = DWMTrainer(model=model, args=args, train_dataset=train, boundaries=bounds, reward=reward,
                         meta=MetaConfig(steps=4, lr=1e-3), dwm=a.dwm, dwm_tokenizer=a.tokenizer)  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume == "last" else a.resume)


if __name__ == "__main__":
    main()
