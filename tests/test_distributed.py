"""Collectives, checkpoint agreement, the DWM broadcast and step statistics on 2 real gloo ranks (spawned)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessRaisedException

from .spawn import run_distributed

# --------------------------------------------------------------------------- building the LM


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


# --------------------------------------------------------------------------- collectives


def _broadcast(d):
    from dwmtrain.distributed import broadcast_object, broadcast_tensors

    state = None
    if d.is_main:
        state = {
            "w": torch.arange(12, dtype=torch.float32).view(3, 4),
            "b": torch.tensor([1.5], dtype=torch.float64),
            "i": torch.tensor([7, 8], dtype=torch.int64),
        }
    got = broadcast_tensors(state, d.device)
    meta = broadcast_object({"from": d.rank} if d.is_main else None)
    return got, meta


def test_broadcast_tensors_and_objects_reach_every_rank():
    (r0, m0), (r1, m1) = run_distributed(_broadcast)
    assert m0 == m1 == {"from": 0}
    assert list(r1) == ["w", "b", "i"]
    for k in r0:
        assert r1[k].dtype == r0[k].dtype and torch.equal(r1[k], r0[k])
    assert r1["w"][2, 3].item() == 11.0


def _grads(d):
    from dwmtrain.distributed import all_reduce_grads

    p1, p2 = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True)
    p1.grad = torch.full((3,), float(d.rank + 1))  # rank 0: 1, rank 1: 2
    p2.grad = torch.full((2, 2), float(10 * (d.rank + 1)))
    norm = all_reduce_grads([p1, p2])
    return p1.grad, p2.grad, norm


def test_all_reduce_grads_averages_over_ranks():
    (a1, a2, n0), (b1, b2, n1) = run_distributed(_grads)
    assert torch.equal(a1, torch.full((3,), 1.5)) and torch.equal(b1, a1)
    assert torch.equal(a2, torch.full((2, 2), 15.0)) and torch.equal(b2, a2)
    assert n0 == n1 == pytest.approx((3 * 1.5**2 + 4 * 15.0**2) ** 0.5)


# --------------------------------------------------------------------------- step statistics

LOSSES = {0: [[2.0, 4.0], [1.0, 3.0]], 1: [[5.0, 1.0], [2.0, 2.0]]}  # rank -> micro-batches of 2 samples
WEIGHTS = {0: [[1.0, 1.0], [0.5, 1.5]], 1: [[1.8, 0.2], [1.0, 1.0]]}


def _step_stats(d):
    from dwmtrain.train.loop import StepStats

    s = StepStats()
    for losses, w in zip(LOSSES[d.rank], WEIGHTS[d.rank]):
        s.add(torch.tensor(losses), torch.tensor(w))
    return s.reduce()


def test_step_statistics_reduce_over_ranks():
    from dwmtrain.models.dwm import weight_stats

    r0, r1 = run_distributed(_step_stats)
    assert r0 == r1
    mbs = [(torch.tensor(lo), torch.tensor(w)) for r in (0, 1) for lo, w in zip(LOSSES[r], WEIGHTS[r])]
    assert r0["loss"] == pytest.approx(sum((w * lo).mean().item() for lo, w in mbs) / 4)
    assert r0["loss_unweighted"] == pytest.approx(sum(lo.mean().item() for lo, _ in mbs) / 4)
    assert r0["w_ess"] == pytest.approx(sum(weight_stats(w)["ess"] for _, w in mbs) / 4)
    assert (r0["w_min"], r0["w_max"]) == pytest.approx((0.2, 1.8))  # both from rank 1


# --------------------------------------------------------------------------- checkpoints


class ShardEngine:
    """Stands in for a DeepSpeed engine: one shard file per rank, holding the rank and the client state."""

    def __init__(self, rank: int, forget_optimizer: bool = False):
        self.rank, self.forget_optimizer = rank, forget_optimizer

    def shard(self, root, tag, kind="optim") -> Path:
        return Path(root) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_{kind}_states.pt"

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed's own non-atomic `latest` is never written
        self.shard(root, tag).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"rank": self.rank, "client": client_state}, self.shard(root, tag, "model"))
        if not self.forget_optimizer:
            torch.save({"rank": self.rank, "client": client_state}, self.shard(root, tag))

    def load_checkpoint(self, root, tag, **kw):
        path = self.shard(root, tag)
        if not path.exists():
            return None, None
        self.loaded = torch.load(path, weights_only=True)
        return str(path), self.loaded["client"]


COMPAT = {"global_batch_size": 32, "world_size": 2, "config_sha256": "c" * 64}


def checkpointer(d, root, compat=COMPAT, keep_last=2):
    from dwmtrain.checkpoint import Checkpointer
    from dwmtrain.rundir import RunDir

    return Checkpointer(RunDir(root), d, compat=compat, global_batch_size=32, keep_last=keep_last, keep_stage=True)


def _save_prune_leftovers(d, root):
    ck, eng = checkpointer(d, root), ShardEngine(d.rank)
    for step in (2, 4, 6, 8, 10):
        ck.save(eng, step=step, stage=1 if step < 4 else 2, boundary=step == 4, dwm={"sha256": "a" * 64})
    if d.is_main:  # a killed run left half of step 12 behind: no marker, a stray file
        (ck.rd.checkpoint("step0000012")).mkdir()
        (ck.rd.checkpoint("step0000012") / "stray.pt").write_bytes(b"partial")
    from dwmtrain.distributed import barrier

    barrier()
    before = ck.latest()
    ck.save(eng, step=12, stage=2, boundary=False, dwm={"sha256": "a" * 64})
    return before.tag, ck.rd.complete_tags()


def test_checkpoint_save_prunes_periodic_keeps_boundaries_and_replaces_leftovers(tmp_path):
    (before, tags), _ = run_distributed(_save_prune_leftovers, str(tmp_path))
    assert before == "step0000010"  # the marker-less leftover at step 12 is never resumed from
    assert tags == ["step0000004", "step0000010", "step0000012"]  # keep_last=2 periodic + the boundary
    ck = tmp_path / "checkpoints"
    assert not (ck / "step0000012" / "stray.pt").exists()
    assert json.loads((ck / "latest.json").read_text()) == {"tag": "step0000012", "step": 12}
    marker = json.loads((ck / "step0000004" / "COMPLETE").read_text())
    assert marker["stage_boundary"] and marker["consumed_samples"] == 4 * 32 and marker["compat"] == COMPAT
    for tag in tags:  # both ranks' shards and RNG states
        assert sorted(p.name for p in (ck / tag).glob("*.pt")) == [
            f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")
        ]
        assert sorted(p.name for p in (ck / tag / "rng").iterdir()) == ["rank0.pt", "rank1.pt"]


def _resume(d, root, compat):
    ck, eng = checkpointer(d, root), ShardEngine(d.rank)
    torch.manual_seed(100 + d.rank)
    ck.save(eng, step=6, stage=2, boundary=False, dwm={"sha256": "b" * 64})
    expected = torch.rand(3)  # the draws right after the save
    torch.manual_seed(999)
    state = checkpointer(d, root, compat).resume(eng)
    return state, torch.rand(3), expected, eng.loaded["rank"]


def test_resume_returns_the_run_state_and_restores_each_ranks_rng(tmp_path):
    (s0, got0, exp0, shard0), (s1, got1, exp1, shard1) = run_distributed(_resume, str(tmp_path), COMPAT)
    assert s0 == s1 and (s0.tag, s0.step, s0.stage, s0.consumed_samples) == ("step0000006", 6, 2, 192)
    assert s0.dwm_in_use([0, 4, 8]) == {2: "b" * 64} and s0.dwm_in_use([0, 6]) == {}
    assert (shard0, shard1) == (0, 1)  # every rank loaded its own shard
    assert torch.equal(got0, exp0) and torch.equal(got1, exp1) and not torch.equal(exp0, exp1)


def test_resume_refuses_a_breaking_change_on_every_rank(tmp_path):
    with pytest.raises(ProcessRaisedException, match="the global batch .* checkpoint has 32, now 64"):
        run_distributed(_resume, str(tmp_path), {**COMPAT, "global_batch_size": 64})


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    from dwmtrain.distributed import Dist
    from dwmtrain.rundir import RunDir

    d = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")
    ck, eng = checkpointer(d, tmp_path), ShardEngine(0)
    for step in (2, 4):
        ck.save(eng, step=step, stage=1, boundary=False, dwm={})
    rd = RunDir(tmp_path)
    rd.latest.write_text("{not json")
    assert ck.latest().tag == "step0000004"
    rd.latest.write_text(json.dumps({"tag": "step0000009", "step": 9}))  # points at a missing checkpoint
    assert ck.latest().tag == "step0000004"
    rd.marker("step0000004").unlink()  # no marker: not complete
    assert ck.latest().tag == "step0000002"
    assert checkpointer(d, tmp_path / "fresh").latest() is None


class FullDiskEngine(ShardEngine):
    def save_checkpoint(self, root, tag, client_state, save_latest):
        import errno

        path = self.shard(root, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_disk_that_fills_during_a_save_is_a_checkpoint_error_and_the_last_checkpoint_stays(tmp_path):
    from dwmtrain.checkpoint import CheckpointError
    from dwmtrain.distributed import Dist

    d, one = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu"), {**COMPAT, "world_size": 1}
    ck = checkpointer(d, tmp_path, one)
    ck.save(ShardEngine(0), step=2, stage=1, boundary=False, dwm={})
    with pytest.raises(CheckpointError, match=r"saving checkpoint step0000004 on .* \(rank 0\): \[Errno 28\] No space"):
        ck.save(FullDiskEngine(0), step=4, stage=1, boundary=False, dwm={})
    assert ck.latest().tag == "step0000002" and not (tmp_path / "checkpoints" / "step0000004" / "COMPLETE").exists()
    assert checkpointer(d, tmp_path, one).resume(ShardEngine(0)).tag == "step0000002"


# --------------------------------------------------------------------------- the DWM hand-off


def _handoff(d, root, dwm_path, mode, rank0_raises=False):
    import dwmtrain.stages.handoff as handoff
    from dwmtrain.config import load_config
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.rundir import RunDir

    if d.is_main and rank0_raises:  # something no one planned for, on rank 0 only

        def unexpected(*a, **k):
            raise KeyError("no such thing")

        handoff.load_dwm_state = unexpected
    if not d.is_main:  # only rank 0 may read the file: the others get the tensors over gloo

        def no_file_access(*a, **k):
            raise AssertionError(f"rank {d.rank} read the DWM file")

        handoff.load_dwm_state = no_file_access
    ov = [f"run.run_dir={root}", f"meta.mode={mode}", f"meta.dwm_path={dwm_path}"]
    h = handoff.StageHandoff(load_config(None, ov), d, DWMArch("tiny", 512, 32), torch.float32, RunDir(root))
    try:
        w = h.for_stage(2, "step0000004")
        model, info = w.model, w.info
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks every rank raised the same
        return type(e).__name__, str(e)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (8, 32))
    return model(x), info


def _saved_dwm(path: Path):
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch, save_dwm

    torch.manual_seed(0)
    m = DataWeightingModel(DWMArch("tiny", 512, 32))
    torch.nn.init.normal_(m.fc2.weight)
    meta = save_dwm(m, path, stage=2, lm_step=4)
    torch.manual_seed(0)
    return m.eval()(torch.randint(0, 512, (8, 32))), meta


@pytest.mark.parametrize("mode", ["fixed", "bilevel"])
def test_dwm_broadcast_from_rank0_gives_every_rank_the_same_model(tmp_path, mode):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)  # bilevel reuses the finished stage-2 DWM; fixed reads it from dwm_path
    want, meta = _saved_dwm(path)
    (w0, i0), (w1, i1) = run_distributed(_handoff, str(tmp_path), str(path), mode)
    assert i0 == i1 and i0["sha256"] == meta["sha256"]
    assert torch.allclose(w0, want) and torch.equal(w0, w1) and not torch.allclose(want, torch.ones(8))


def test_corrupted_dwm_fails_on_every_rank_at_once(tmp_path):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    r0, r1 = run_distributed(_handoff, str(tmp_path), str(path), "fixed")
    assert r0 == r1 and r0[0] == "DWMFileError" and "corrupted or replaced" in r0[1]


def test_any_failure_on_rank0_in_the_handoff_fails_every_rank_at_once(tmp_path):
    import time

    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    t0 = time.time()  # the process group's timeout is 60 s: a rank left waiting would take that long
    r0, r1 = run_distributed(_handoff, str(tmp_path), str(path), "fixed", True)
    assert r0[0] == "KeyError" and r1[0] == "RankZeroError" and "KeyError: 'no such thing'" in r1[1]
    assert time.time() - t0 < 40


# --------------------------------------------------------------------------- node-local storage


def _node_local(d, root, drop_on_node1):
    """Each rank is a node with its own disk (root/nodeR); rank 0's storage alone holds markers."""
    from dwmtrain.distributed import Dist

    node = Dist(d.rank, d.world, 0, 1, d.device, "cpu")  # local rank 0 on its own node
    ck, eng = checkpointer(node, Path(root) / f"node{d.rank}"), ShardEngine(d.rank)
    for step in (2, 4, 6, 8):
        ck.save(eng, step=step, stage=1, boundary=False, dwm={})
    kept = sorted(p.name for p in ck.rd.checkpoints.iterdir() if p.is_dir())
    if d.rank == 1:  # node 1 lost its copy of the newest checkpoint, or of every checkpoint
        for tag in {"none": [], "newest": ["step0000008"], "all": kept}[drop_on_node1]:
            (ck.rd.checkpoint(tag) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            state = checkpointer(node, Path(root) / f"node{d.rank}").resume(eng)
    except Exception as e:  # noqa: BLE001 - every rank must raise the same error
        return kept, f"{type(e).__name__}: {e}"
    return kept, (state.tag, eng.loaded["rank"]), out.getvalue()


def test_node_local_storage_rank0_decides_every_node_prunes_and_resumes(tmp_path):
    (k0, r0, _), (k1, r1, _) = run_distributed(_node_local, str(tmp_path), "none")
    assert k0 == k1 == ["step0000006", "step0000008"]  # pruned on both nodes
    assert not (tmp_path / "node1" / "checkpoints" / "latest.json").exists()  # node 1 never had markers...
    assert (r0, r1) == (("step0000008", 0), ("step0000008", 1))  # ...and still resumes where rank 0 does


def test_node_local_storage_missing_part_falls_back_and_names_host_and_file(tmp_path):
    import socket

    (_, r0, log0), (_, r1, _) = run_distributed(_node_local, str(tmp_path), "newest")
    assert (r0, r1) == (("step0000006", 0), ("step0000006", 1))  # every rank resumes from the same one
    assert f"skipping checkpoint {tmp_path}/node0/checkpoints/step0000008:" in log0
    assert f"zero_pp_rank_1_mp_rank_00_optim_states.pt is missing on {socket.gethostname()}" in log0
    assert (tmp_path / "node0" / "checkpoints" / "step0000008").is_dir()  # skipped, not deleted
    (_, e0), (_, e1) = run_distributed(_node_local, str(tmp_path / "b"), "all")
    assert e0 == e1 and e0.startswith("ResumeError: no checkpoint in") and "(their files are kept)" in e0
    assert "step0000008: zero_pp_rank_1" in e0 and "step0000006: zero_pp_rank_1" in e0


def _broken_checkpoints(d, root):
    from dwmtrain.distributed import barrier

    ck, eng = checkpointer(d, root, keep_last=4), ShardEngine(d.rank)
    for step in (2, 4, 6, 8, 10):
        ck.save(eng, step=step, stage=1, boundary=False, dwm={})
    if d.is_main:
        shard = ck.rd.checkpoint("step0000008") / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        shard.write_bytes(shard.read_bytes()[:-7])  # truncated
        ck.rd.marker("step0000006").write_text(ck.rd.marker("step0000004").read_text())  # another step's marker
        shutil.rmtree(ck.rd.checkpoint("step0000010"))  # latest.json names a deleted directory
    barrier()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        state = checkpointer(d, root, keep_last=4).resume(eng)
        for step in (6, 8):  # the run goes on past the skipped ones: they are moved aside, not deleted
            ck.save(eng, step=step, stage=1, boundary=False, dwm={})
    return state.tag, eng.loaded["rank"], out.getvalue()


def test_resume_skips_truncated_mismatched_and_deleted_checkpoints_and_keeps_them(tmp_path):
    (tag0, rank0, log), (tag1, rank1, _) = run_distributed(_broken_checkpoints, str(tmp_path))
    assert (tag0, rank0, tag1, rank1) == ("step0000004", 0, "step0000004", 1)
    ck = tmp_path / "checkpoints"
    assert f"skipping checkpoint {ck}/step0000010: latest.json names it, but the directory is gone" in log
    assert re.search(
        rf"skipping checkpoint {ck}/step0000008: zero_pp_rank_1_mp_rank_00_optim_states.pt is [\d,]+ bytes, "
        r"the save wrote [\d,]+ \(truncated or replaced\) on ",
        log,
    )
    assert f"skipping checkpoint {ck}/step0000006: its COMPLETE marker records step 4" in log
    moved = sorted(p.name.split("-")[0] for p in (ck / "unverified").iterdir())
    assert moved == ["step0000006", "step0000008"] and "kept, not deleted" in log
    (old8,) = (ck / "unverified").glob("step0000008-*")
    assert json.loads((old8 / "COMPLETE").read_text())["step"] == 8  # the user's files, as they were
    assert json.loads((ck / "step0000008" / "COMPLETE").read_text())["files"]  # a fresh, verified save


def _incomplete_save(d, root):
    ck = checkpointer(d, root)
    ck.save(ShardEngine(d.rank), step=2, stage=1, boundary=False, dwm={})
    try:
        ck.save(ShardEngine(d.rank, forget_optimizer=d.rank == 1), step=4, stage=1, boundary=False, dwm={})
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def test_a_save_missing_a_ranks_part_is_never_marked_complete(tmp_path):
    e0, e1 = run_distributed(_incomplete_save, str(tmp_path))
    assert e0 == e1 and e0.startswith("CheckpointError: saving checkpoint step0000004")
    assert not (tmp_path / "checkpoints" / "step0000004" / "COMPLETE").exists()
    assert json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["tag"] == "step0000002"
