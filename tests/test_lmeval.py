"""lm-eval on the paper's tasks, offline, from the small task files in tests/data/lmeval."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from dwmtrain.errors import ConfigError, DWMTrainError
from dwmtrain.eval import LAMBADA_TASK, PAPER_TASKS, REPORTED_METRIC, TASKS, EvalDataError, run_lm_eval
from dwmtrain.eval.tasks import required_splits, task_config

from .conftest import REPO, SP_MODEL

DATA = REPO / "tests" / "data" / "lmeval"
ALL_TASKS = [*PAPER_TASKS, LAMBADA_TASK]


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dwmtrain.data.sentencepiece_tokenizer import export_hf

    out = tmp_path_factory.mktemp("lmeval") / "model"
    export_hf(SP_MODEL, out)  # creates the directory; the model is saved beside the tokenizer
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Refuse and record every attempt to reach the network (a caller may swallow the error; the record stays)."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError(f"network access attempted in a test: {args[:2]}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_specs_match_installed_yamls():
    for name, spec in TASKS.items():
        cfg = task_config(name)
        assert cfg["task"] == name
        assert (cfg["dataset_path"], cfg.get("dataset_name")) == (spec.hub_path, spec.hub_name), name
        produced = {m["metric"] for m in cfg["metric_list"]}
        assert set(spec.metrics) <= produced, name
        # normalized accuracy wherever the task has it, accuracy otherwise (the paper's rule)
        want = "acc_norm" if "acc_norm" in produced else "acc"
        assert REPORTED_METRIC[name] == want, name
        for split in required_splits(name):
            assert (DATA / name / f"{split}.jsonl").is_file()
    assert sorted(ALL_TASKS) == sorted(TASKS)


def test_paper_tasks_zero_and_two_shot(tiny_model, tmp_path, no_network):
    import datasets.config
    import huggingface_hub.constants

    before = ({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")},
              huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)  # fmt: skip
    runs = {
        k: run_lm_eval(tiny_model, ALL_TASKS, k, DATA, cache_dir=tmp_path / "cache", log_samples=True) for k in (0, 2)
    }
    after = ({k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")},
             huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)  # fmt: skip
    assert after == before  # offline mode is set for the call only
    assert no_network == []

    for k, run in runs.items():
        assert run["lm_eval_version"].startswith("0.4")
        assert run["config"]["num_fewshot"] == k and run["config"]["tasks"] == ALL_TASKS
        assert set(run["results"]) == set(ALL_TASKS)
        for task, res in run["results"].items():
            metric = REPORTED_METRIC[task]
            assert isinstance(res[metric], float) and 0.0 <= res[metric] <= 1.0, (task, res)
            assert f"{metric}_stderr" in res
            eval_file = DATA / task / f"{required_splits(task)[0]}.jsonl"
            assert res["n"] == _lines(eval_file), task
            assert res["num_fewshot"] == k
            assert len(run["samples"][task]) == res["n"]
        assert run["results"][LAMBADA_TASK]["perplexity"] > 1.0

    # The 2-shot prompt of every document is its 0-shot prompt behind exactly two examples, each closed by
    # lm-eval's few-shot delimiter (the test documents themselves contain no blank line).
    for task in ALL_TASKS:
        zero = {s["doc_id"]: s for s in runs[0]["samples"][task]}
        for s in runs[2]["samples"][task]:
            for (ctx2, cont2), (ctx0, cont0) in zip(s["arguments"], zero[s["doc_id"]]["arguments"], strict=True):
                assert cont2 == cont0 and "\n\n" not in ctx0, task
                assert ctx2.endswith(ctx0) and ctx2 != ctx0, task
                prefix = ctx2[: -len(ctx0)]
                shots = prefix.split("\n\n")
                assert len(shots) == 3 and shots[2] == "" and all(shots[:2]), (task, ctx2)
                assert shots[0] != shots[1]
                # lambada draws its shots from the scored split: never the scored document itself
                assert ctx0 not in prefix, (task, ctx2)


def test_missing_data_is_a_clear_error(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "piqa" / "validation.jsonl").unlink()
    # the data check comes before lm-eval or the model is touched: a model that does not exist is never reached
    with pytest.raises(EvalDataError) as e:
        run_lm_eval(tmp_path / "no-model", ["arc_easy", "piqa"], 0, data)
    msg = str(e.value)
    assert isinstance(e.value, DWMTrainError)
    assert msg.startswith(f"lm-eval data for task piqa: {data / 'piqa' / 'validation.jsonl'} not found")
    assert "docs/evaluation.md" in msg
    with pytest.raises(ConfigError, match="unknown lm-eval task 'mmlu'"):
        run_lm_eval(tmp_path / "no-model", ["mmlu"], 0, data)


def _fetch_tool():
    spec = importlib.util.spec_from_file_location("fetch_eval_data", REPO / "tools" / "fetch_eval_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LOGIQA_TXT = """
c
The museum opens only on days when it is not raining.Yesterday the museum was open.
Which of the following can be inferred?
A.It rained yesterday.
B.The museum is always open.
C.It did not rain yesterday.
D.The museum was closed today.

a
All of the team's players trained on Monday.Ana is one of the team's players.
Which of the following must be true?
A. Ana trained on Monday.
B. Ana trained only on Monday.
C. Ana is the coach.
D. Ana did not play.
"""


def test_logiqa_text_parser():
    records = _fetch_tool().parse_logiqa(LOGIQA_TXT)
    assert records == [
        {
            "label": "c",
            # as EleutherAI/logiqa's script: every "." gets a space after it, then the line is stripped
            "context": "The museum opens only on days when it is not raining. Yesterday the museum was open.",
            "question": "Which of the following can be inferred?",
            "options": [
                "It rained yesterday.",
                "The museum is always open.",
                "It did not rain yesterday.",
                "The museum was closed today.",
            ],
        },
        {
            "label": "a",
            "context": "All of the team's players trained on Monday. Ana is one of the team's players.",
            "question": "Which of the following must be true?",
            "options": [
                "Ana trained on Monday.",
                "Ana trained only on Monday.",
                "Ana is the coach.",
                "Ana did not play.",
            ],
        },
    ]
    # the records are what lm-eval's logiqa prompt functions read
    from lm_eval.tasks.logiqa import utils_logiqa

    assert utils_logiqa.doc_to_target(records[0]) == 2
    assert "C. It did not rain yesterday.\nD. The museum was closed today.\nAnswer:" in utils_logiqa.doc_to_text(
        records[0]
    )
    with pytest.raises(ValueError, match="record 1"):
        _fetch_tool().parse_logiqa("\nx\nctx\nq?\nA. a\nB. b\n")


def test_fetch_tool_writes_the_layout_for_logiqa(tmp_path, capsys):
    src = tmp_path / "LogiQA-dataset"
    src.mkdir()
    for name in ("Train.txt", "Eval.txt", "Test.txt"):
        (src / name).write_text(LOGIQA_TXT, encoding="utf-8")
    out = tmp_path / "data"
    assert _fetch_tool().main(["--out", str(out), "--tasks", "logiqa", "--logiqa-source", str(src)]) == 0
    from dwmtrain.eval.tasks import check_data

    files = check_data(["logiqa"], out)
    assert set(files) == {"logiqa"} and sorted(files["logiqa"]) == ["test", "train"]
    assert [json.loads(line)["label"] for line in files["logiqa"]["test"].read_text().splitlines()] == ["c", "a"]
