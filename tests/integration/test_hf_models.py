"""Hugging Face models as the LM: continued pretraining from an exported checkpoint (real 2-rank launches)."""

import json
import sys

import pytest
import torch

from dwmtrain.rundir import RunDir

from .helpers import by_step, pretrain_cmd, run, short_run

pytestmark = pytest.mark.slow


def _first_batch_loss(hf_dir, data_dir, seed: int, global_batch: int) -> float:
    """The mean per-sample loss of the exported model on a run's first global batch (its data order)."""
    from transformers import AutoModelForCausalLM

    from dwmtrain.data.dataset import GlobalOrder, TokenDataset
    from dwmtrain.models.loss import per_sample_loss

    data = TokenDataset(data_dir)
    order = GlobalOrder(len(data), seed)
    x = data.batch([order[g] for g in range(global_batch)])
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # no trust_remote_code
    with torch.no_grad():
        return per_sample_loss(model(input_ids=x).logits, x).mean().item()


def test_continued_pretraining_starts_from_the_exported_weights_and_a_resume_never_needs_them(tmp_path, data64):
    first, hf, cont = tmp_path / "first", tmp_path / "hf", tmp_path / "cont"
    args = short_run(data64, "meta.mode=none", "stages.total_steps=4", "stages.num_stages=1")
    run(pretrain_cmd(first, args))
    run([sys.executable, "-m", "dwmtrain", "export", str(first), "--out", str(hf)])
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 4096

    cont_args = [*args, f"model.init_from={hf}", "run.seed=77"]  # another data order than the first run's
    run(pretrain_cmd(cont, cont_args))
    step1 = by_step(cont / "metrics.jsonl")[1]["loss"]
    want = _first_batch_loss(hf, data64, 77, 32)
    assert step1 == pytest.approx(want, rel=1e-5), (step1, want)
    fresh = by_step(first / "metrics.jsonl")[1]["loss"]
    assert abs(step1 - fresh) > 0.1  # the exported model, not a fresh one, took the first step

    assert RunDir(cont).model_config.is_file()  # the run keeps its model's config.json
    hf.rename(tmp_path / "hf-moved")  # gone: a resume needs neither its weights nor its config
    p = run(pretrain_cmd(cont, [*cont_args, "stages.total_steps=6"]))
    assert f"resumed from {RunDir(cont).checkpoint('step0000004')}" in p.stdout + p.stderr
    assert max(by_step(cont / "metrics.jsonl")) == 6

    (tmp_path / "hf-moved").rename(hf)
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    p = run(pretrain_cmd(tmp_path / "again", cont_args), check=False)  # a fresh start does read them
    assert p.returncode == 2 and "model.init_from=" in p.stderr and "model.safetensors cannot be read" in p.stderr


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    """A tiny Llama-3-style model (GQA 4/2 heads, tied embeddings, rope_theta 500000), a byte-level BPE
    tokenizer.json trained on the bundled corpus, and FineWeb-Edu-style parquet shards of it, prepared."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import LlamaConfig

    from dwmtrain.data.hf_tokenizer import train_hf_tokenizer

    from ..conftest import corpus_records

    work = tmp_path_factory.mktemp("llama3")
    recs = corpus_records()
    tok = train_hf_tokenizer((r["text"] for r in recs), work / "tok", vocab_size=2048)
    rows = [{"text": r["text"], "id": str(i), "dump": r["meta"]["redpajama_set_name"], "score": 3.0}
            for i, r in enumerate(recs)]  # fmt: skip
    for k in range(3):
        (work / "fineweb" / f"CC-MAIN-{k}").mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows[k::3]), str(work / "fineweb" / f"CC-MAIN-{k}" / "000.parquet"))
    LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1).save_pretrained(work / "model")  # fmt: skip
    run([sys.executable, "-m", "dwmtrain", "prepare-data", "--input", str(work / "fineweb"), "--tokenizer",
         str(tok / "tokenizer.json"), "--out", str(work / "data"), "--seq-len", "64", "--domain-field", "dump",
         "--workers", "2"])  # fmt: skip
    cfg = work / "llama3.yaml"
    cfg.write_text(
        f"base: tiny\nmodel:\n  hf_config: {work / 'model'}\n  vocab_size: 0\n"
        f"data:\n  tokenizer: {tok / 'tokenizer.json'}\n  train_data: {work / 'data'}\n  raw: []\n"
        "dwm:\n  backbone: lm\nstages:\n  total_steps: 12\n  num_stages: 3\n"
        "run:\n  checkpoint_every: 2\nmeta:\n  nproc: 2\n  steps: 3\n"
    )
    return work, cfg


def test_a_llama3_style_model_tokenizer_json_and_parquet_train_bilevel_resume_export_and_eval(llama3_style, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwmtrain.checkpoint import consolidated_lm_state
    from dwmtrain.config import load_config
    from dwmtrain.data.tokenizer import load_tokenizer
    from dwmtrain.models.lm import build_lm, load_lm_state
    from dwmtrain.models.spec import lm_spec

    from .helpers import TASK_DATA, run_until_step_then_kill

    work, cfg = llama3_style
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    p = run(pretrain_cmd(ref, [], config=cfg))
    n = sum(t.numel() for t in build_lm(lm_spec(load_config(cfg).model)).parameters())  # the tied head counted once
    assert f"{n:,} parameters" in p.stdout and n == 223_552, p.stdout[-2000:]
    a = by_step(ref / "metrics.jsonl")
    assert sorted(a) == list(range(1, 13)) and a[12]["loss"] < a[1]["loss"]
    assert {a[s]["dwm"] for s in (5, 9)} != {"uniform"} and (ref / "dwm" / "stage3.safetensors").is_file()
    run_until_step_then_kill(pretrain_cmd(killed, [], config=cfg), killed / "metrics.jsonl", 7)
    run(pretrain_cmd(killed, [], config=cfg))
    b = by_step(killed / "metrics.jsonl")
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]

    hf = tmp_path / "hf"
    run([sys.executable, "-m", "dwmtrain", "export", str(ref), "--out", str(hf)])
    model, auto = AutoModelForCausalLM.from_pretrained(hf), AutoTokenizer.from_pretrained(hf)  # no remote code
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 2
    run_cfg = load_config(RunDir(ref).config)
    lm = build_lm(lm_spec(run_cfg.model))
    assert not load_lm_state(lm, consolidated_lm_state(RunDir(ref), "step0000012"))
    x = torch.randint(2, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, lm.eval()(x).logits, rtol=1e-5, atol=1e-5)
    text = "Grüße, def f(x):\n\treturn x"
    assert auto(text, add_special_tokens=False)["input_ids"] == load_tokenizer(work / "tok" / "tokenizer.json").encode(
        text
    )
    p = run([sys.executable, "-m", "dwmtrain", "eval", str(ref), "--task-data", str(TASK_DATA), "--tasks",
             "arc_easy,piqa", "--shots", "0", "--limit", "4", "--out", str(tmp_path / "eval")])  # fmt: skip
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["0shot"]
    assert [r["stage"] for r in rows] == [1, 2, 3] and all(r["AVERAGE"] is not None for r in rows)


def test_sequences_of_2048_train_through_a_stage_boundary_with_a_meta_update(tmp_path):
    from dwmtrain.data.prepare import prepare_data

    from ..conftest import CORPUS

    data = tmp_path / "data-2048"
    prepare_data([str(CORPUS / "sample.jsonl.zst")], str(CORPUS / "sample_sp4096.model"), str(data), seq_len=2048,
                 workers=2, progress=False)  # fmt: skip
    args = [f"data.train_data={data}", "data.seq_len=2048", "model.max_seq_len=2048", "stages.total_steps=4",
            "stages.num_stages=2", "deepspeed.micro_batch_size=2", "deepspeed.global_batch_size=4",
            "meta.mode=bilevel", "meta.nproc=2", "meta.steps=2", "meta.val_batch_size=2",
            "data.val_source=heldout", "run.eval_batches=1"]  # fmt: skip
    run(pretrain_cmd(tmp_path / "r", args))
    m = by_step(tmp_path / "r" / "metrics.jsonl")
    assert sorted(m) == [1, 2, 3, 4] and m[3]["dwm"].startswith("stage2:") and m[4]["w_min"] < m[4]["w_max"]
