"""The public API (``dwmtrain.DWM``, ``weighted_lm_loss``, ``meta_update``, ``DWMTrainer``) in process: what it
computes, that the run's files and its own are one format, and that every bad input is one catchable line."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dwmtrain
from dwmtrain import DWM, DWMConfig, DWMInputError, DWMTrainError, MetaConfig, meta_update, weighted_lm_loss
from dwmtrain.models.loss import per_sample_loss, weighted_loss

from .conftest import SP_MODEL

V, T, B = 4096, 16, 8


def tiny_lm(seed: int = 0, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=T)  # fmt: skip
    return LlamaForCausalLM(cfg)


def ids(n: int, seed: int, vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A DWM fitted through the API on a tiny Llama, written with the bundled tokenizer: (model, DWM, path)."""
    lm = tiny_lm()
    path = tmp_path_factory.mktemp("api") / "stage2.safetensors"
    dwm = meta_update(lm, [ids(B, s) for s in range(3)], ids(8, 99), meta=MetaConfig(steps=3, lr=1e-2),
                      lookahead_lr=1e-2, tokenizer=str(SP_MODEL), out=path)  # fmt: skip
    return lm, dwm, path


def test_the_public_names_import_from_dwmtrain_without_importing_torch_until_used():
    for name in dwmtrain.__all__:
        assert getattr(dwmtrain, name) is not None, name
    out = subprocess.run([sys.executable, "-c", "import dwmtrain, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"


def test_a_fitted_dwm_round_trips_through_its_file_and_weighs_with_mean_one(fitted):
    lm, dwm, path = fitted
    again = DWM.load(path, tokenizer=SP_MODEL)
    x = ids(B, 5)
    w = again(x)
    assert torch.equal(w, dwm(x)) and w.shape == (B,) and not w.requires_grad
    assert abs(w.mean().item() - 1) < 1e-5 and w.std() > 0  # fitted: not uniform
    assert again.stage == 2 and again.micro_batch_size == B and again.meta["meta_steps"] == 3
    assert again.meta["tokenizer_sha256"] and again.meta["lookahead_lr"] == pytest.approx(1e-2)
    with torch.no_grad():  # the very model the run applies: DataWeightingModel.forward
        assert torch.allclose(w, again.model(x).float())
    assert torch.allclose(DWM.load(path)(ids(12, 6)).mean(), torch.tensor(1.0))  # a larger micro-batch is allowed


def test_meta_update_from_a_model_and_from_its_checkpoint_directory_fit_the_same_dwm(tmp_path):
    lm = tiny_lm(1)
    lm.save_pretrained(tmp_path / "hf", safe_serialization=True)
    batches, reward = [ids(B, s) for s in range(2)], ids(8, 98)
    exact = MetaConfig(steps=2, lr=1e-2, grad_mode="per_sample")  # fd's rounding would differ between the two heads
    a = meta_update(lm, batches, reward, meta=exact, lookahead_lr=1e-2, seed=3)
    b = meta_update(tmp_path / "hf", batches, reward, meta=exact, lookahead_lr=1e-2, seed=3)
    x = ids(B, 7)
    assert a(x).std() > 0 and torch.allclose(a(x), b(x), atol=1e-4)
    c = meta_update(lm, batches, reward, dwm=a, meta=MetaConfig(steps=1), lookahead_lr=1e-2)  # continued
    assert c.stage == 3 and not torch.equal(c(x), a(x))


def test_the_adam_aware_meta_update_reads_the_optimizers_moments_by_parameter_name():
    from dwmtrain.meta.inputs import adam_moments

    lm = tiny_lm(2)
    decay = [p for n, p in lm.named_parameters() if "norm" not in n]
    norms = [p for n, p in lm.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}])
    with pytest.raises(DWMInputError, match="no Adam moments"):
        adam_moments(opt, lm)
    lm(input_ids=ids(B, 1), labels=ids(B, 1)).loss.backward()
    opt.step()
    m = adam_moments(opt, lm)
    name, p = "model.layers.0.mlp.up_proj.weight", lm.model.layers[0].mlp.up_proj.weight
    assert torch.equal(m.exp_avg[name], opt.state[p]["exp_avg"]) and m.step == 1
    assert m.decay(name) == 0.1 and m.decay("model.norm.weight") == 0.0
    dwm = meta_update(lm, [ids(B, 3)], ids(4, 4), optimizer=opt, meta=MetaConfig(steps=2, lookahead="adam"))
    assert dwm.meta["lookahead"] == "adam" and dwm.meta["lookahead_lr"] == opt.param_groups[0]["lr"]


def test_the_meta_update_leaves_the_callers_model_gradients_and_rng_as_they_were():
    """Under accelerate's mixed precision the model's forward is an autocast wrapper: the meta-update reads the LM's
    own forward (bf16 matmuls would drown the fd step) and puts the wrapper back; a gradient the caller accumulated
    and the global RNG are untouched; frozen parameters are not moved by the lookahead (the Adam-aware one needs
    no moments for them)."""
    import types

    from dwmtrain.meta.inputs import frozen

    lm = tiny_lm(4)
    x = ids(B, 1)
    plain = lm(input_ids=x).logits
    lm._original_forward = lm.forward  # what accelerate.prepare_model does under mixed_precision="bf16"
    lm.forward = types.MethodType(torch.autocast("cpu", dtype=torch.bfloat16)(lm.forward.__func__), lm)
    wrapper = lm.forward
    assert not torch.allclose(lm(input_ids=x).logits.float(), plain, atol=1e-4)
    with frozen(lm):
        assert torch.allclose(lm(input_ids=x).logits, plain)
    assert lm.forward == wrapper
    lm.model.embed_tokens.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad])
    lm(input_ids=x, labels=x).loss.backward()
    opt.step()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    meta_update(lm, [ids(B, 2)], ids(4, 3), optimizer=opt, meta=MetaConfig(steps=1, lookahead="adam", v="boundary"))
    assert torch.equal(torch.rand(3), want)
    assert all(torch.equal(p.grad, grads[n]) for n, p in lm.named_parameters() if n in grads)


def test_the_trainer_divides_its_micro_batch_loss_by_the_accumulation_steps(fitted, tmp_path):
    lm, dwm, path = fitted
    t = trainer(lm, tmp_path, dwm=path)
    t.current_gradient_accumulation_steps = 2
    x = ids(B, 13)
    lm.zero_grad()
    # the Trainer passes the tokens of the whole accumulated batch, as to a loss it would normalize by them
    got = t.training_step(lm, {"input_ids": x, "labels": x}, num_items_in_batch=torch.tensor(2 * B * (T - 1)))
    with torch.no_grad():
        want = weighted_loss(per_sample_loss(lm(input_ids=x).logits, x), dwm(x))
    assert torch.allclose(got, want / 2, atol=1e-6)  # as the Trainer's own loss of one of two micro-batches
    lm.zero_grad()


def _bad_batch_on_rank_1(d):
    lm = tiny_lm(5)
    x = ids(B, 1) + (V if d.rank == 1 else 0)  # rank 1's ids are of another tokenizer
    try:
        meta_update(lm, [x], ids(4, 2), lookahead_lr=1e-2, meta=MetaConfig(steps=1))
    except DWMTrainError as e:
        return str(e)
    return "no error"


def test_a_bad_input_on_one_rank_is_every_ranks_error_at_once():
    from .spawn import run_distributed

    r0, r1 = run_distributed(_bad_batch_on_rank_1)
    assert r0 == r1 and r0.startswith("rank 1: train_batches[0]: token id") and "outside" in r0


def test_the_weighted_loss_full_and_fused_agree_in_value_and_gradient(fitted):
    lm, dwm, _ = fitted
    x = ids(B, 8)
    w = dwm(x)
    grads = []
    for chunk in (0, 5):
        lm.zero_grad()
        loss, losses = weighted_lm_loss(lm, x, w, chunk=chunk)
        loss.backward()
        grads.append((loss.detach(), losses, lm.lm_head.weight.grad.clone(), lm.model.embed_tokens.weight.grad.clone()))
    with torch.no_grad():
        want = weighted_loss(per_sample_loss(lm(input_ids=x).logits, x), w)
    assert torch.allclose(grads[0][0], want, atol=1e-6)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
    loss_dwm, _ = weighted_lm_loss(lm, x, dwm)  # a DWM as the weights: its weights of this batch
    assert torch.allclose(loss_dwm, want, atol=1e-6)


def test_a_dwm_that_reads_the_lm_gets_that_forwards_losses_and_states():
    lm = tiny_lm(3)
    settings = DWMConfig(features="lm", loss_feature=True)
    dwm = meta_update(lm, [ids(B, 1)], ids(4, 2), settings=settings, meta=MetaConfig(steps=2, lr=1e-2),
                      lookahead_lr=1e-2)  # fmt: skip
    assert dwm.reads_lm and dwm.model.backbone is None
    x = ids(B, 9)
    with torch.no_grad():
        out = lm(input_ids=x, output_hidden_states=True)
        losses = per_sample_loss(out.logits, x)
        want = weighted_loss(losses, dwm(x, losses=losses, hidden=out.hidden_states[-1]))
        for chunk in (0, 7):
            assert torch.allclose(weighted_lm_loss(lm, x, dwm, chunk=chunk)[0], want, atol=1e-5)
    with pytest.raises(DWMInputError, match="pass them"):
        dwm(x)


def trainer(model, tmp_path, **kw):
    from transformers import TrainingArguments

    from dwmtrain import DWMTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=kw.pop("batch", B),
                             use_cpu=True, report_to=[], max_steps=2)  # fmt: skip
    train = [{"input_ids": x, "labels": x} for x in ids(32, 11)]
    return DWMTrainer(model=model, args=args, train_dataset=train, **kw)


def test_the_trainers_training_loss_is_the_weighted_one_and_its_evaluation_the_plain_one(fitted, tmp_path):
    lm, dwm, path = fitted
    t = trainer(lm, tmp_path, dwm=path, dwm_tokenizer=SP_MODEL)
    x = ids(B, 12)
    lm.train()
    with torch.no_grad():
        got = t.compute_loss(lm, {"input_ids": x, "labels": x})
        want = weighted_loss(per_sample_loss(lm(input_ids=x).logits, x), dwm(x))
        assert torch.allclose(got, want, atol=1e-6)
        assert not torch.allclose(got, per_sample_loss(lm(input_ids=x).logits, x).mean(), atol=1e-6)
        t.compute_loss(lm, {"input_ids": x[:3], "labels": x[:3]})  # a short last batch: uniform, counted
        assert t.stats["short"] == 1
        lm.eval()
        assert torch.allclose(t.compute_loss(lm, {"input_ids": x, "labels": x}), lm(input_ids=x, labels=x).loss)
    lm.train()


def _other_tokenizer(tmp_path):
    from dwmtrain.data.hf_tokenizer import train_hf_tokenizer

    from .conftest import corpus_records

    out = tmp_path / "tok"
    return out if out.is_dir() else train_hf_tokenizer((r["text"] for r in corpus_records(50)), out, vocab_size=300)


def bad_inputs(fitted, tmp_path):
    """(what is wrong, the call, what the one line must name)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    def hf_tok(directory):  # a Trainer's processing_class, loaded from a local directory: its files identify it
        return AutoTokenizer.from_pretrained(str(directory))

    lm, dwm, path = fitted
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2))
    padded = {"input_ids": ids(B, 1), "attention_mask": torch.ones(B, T).index_fill_(1, torch.tensor([T - 1]), 0)}
    meta = MetaConfig(steps=2)
    yield "another tokenizer", lambda: DWM.load(path, tokenizer=_other_tokenizer(tmp_path)), "tokenizer"
    yield "a smaller micro-batch", lambda: dwm(ids(4, 1)), "micro-batches of 8"
    yield "ids of a larger vocabulary", lambda: dwm(ids(B, 1) + V), "outside the vocabulary"
    yield "float ids", lambda: dwm(torch.zeros(B, T)), "input_ids"
    yield "weights of another shape", lambda: weighted_lm_loss(lm, ids(B, 1), torch.ones(B, 1)), "weights"
    yield "an architecture it cannot take", lambda: meta_update(gpt2, [ids(B, 1)], ids(2, 1), lookahead_lr=1), "gpt2"
    yield "an empty reward set", lambda: meta_update(lm, [ids(B, 1)], [], lookahead_lr=1), "reward set is empty"
    yield "padded micro-batches", lambda: meta_update(lm, [padded], ids(2, 1), lookahead_lr=1), "padded"
    yield ("micro-batches that run out", lambda: meta_update(lm, (x for x in [ids(B, 1)]), ids(2, 1), meta=meta,
                                                             lookahead_lr=1), "ran out")  # fmt: skip
    yield "no step size", lambda: meta_update(lm, [ids(B, 1)], ids(2, 1)), "lookahead_lr"
    adam = MetaConfig(lookahead="adam")
    yield "Adam, no optimizer", lambda: meta_update(lm, [ids(B, 1)], ids(2, 1), lookahead_lr=1, meta=adam), "optim"
    small = tiny_lm(vocab=512)
    yield ("a DWM of another vocabulary", lambda: meta_update(small, [ids(B, 1, 512)], ids(2, 1, 512), dwm=dwm,
                                                              lookahead_lr=1), "vocabulary is 512")  # fmt: skip
    yield "a Trainer LM of another vocabulary", lambda: trainer(tiny_lm(vocab=512), tmp_path, dwm=dwm), "512"
    yield ("a Trainer whose own tokenizer is another", lambda: trainer(lm, tmp_path, dwm=path, processing_class=hf_tok(
        _other_tokenizer(tmp_path))), "fitted with tokenizer")  # fmt: skip
    yield "a Trainer batch smaller than fitted", lambda: trainer(lm, tmp_path, dwm=dwm, batch=4), "batch_size=4"
    yield "a boundary that is no step", lambda: trainer(lm, tmp_path, boundaries=[1.5], reward=ids(2, 1)), "1.5"
    yield "boundaries without a reward set", lambda: trainer(lm, tmp_path, boundaries=[1]), "reward"


def test_every_bad_input_is_one_catchable_line_naming_it(fitted, tmp_path):
    for what, call, names in bad_inputs(fitted, tmp_path):
        with pytest.raises(DWMTrainError) as e:
            call()
        msg = str(e.value)
        assert names in msg and "\n" not in msg, (what, msg)


def cli(*argv: str) -> tuple[int, str]:
    from dwmtrain.launch.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        return main(list(argv)), err.getvalue()


def test_the_cli_fits_through_the_api_and_exits_2_naming_a_bad_input(fitted, prepared, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    lm, _, path = fitted
    lm.save_pretrained(tmp_path / "llama", safe_serialization=True)
    GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    common = ["--data", str(prepared), "--reward", str(prepared), "--lookahead-lr", "0.01", "--steps", "2"]
    out = tmp_path / "cli.safetensors"
    assert cli("fit-dwm", "--model", str(tmp_path / "llama"), *common, "--out", str(out)) == (0, "")
    fitted_by_cli = DWM.load(out, tokenizer=SP_MODEL)  # the data's tokenizer, recorded
    assert fitted_by_cli.micro_batch_size == 8 and fitted_by_cli.meta["meta_steps"] == 2
    for argv, names in (
        (["fit-dwm", "--model", str(tmp_path / "gpt2"), *common, "--out", str(tmp_path / "x")], "gpt2"),
        (["fit-dwm", "--model", str(tmp_path / "llama"), *common, "--reward-examples", "0", "--out", str(out)],
         "reward set is empty"),
        (["score", "--dwm", str(path), "--data", str(prepared), "--micro-batch", "4", "--out", f"{tmp_path}/s.jsonl"],
         "--micro-batch=4"),
    ):  # fmt: skip
        code, err = cli(*argv)
        assert code == 2 and names in err and len(err.strip().splitlines()) <= 2, (argv, err)
    assert DWM.load(out).meta["meta_steps"] == 2  # the failed run left the file it would have replaced alone
