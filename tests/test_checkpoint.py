"""The Checkpointer on real gloo ranks (spawned): save, prune, resume, RNG, node-local storage, broken saves."""

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


COMPAT = {"global_batch_size": 32, "world_size": 2, "zero_stage": 3, "tensor_parallel": 1, "config_sha256": "c" * 64}


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
    assert (ck / "latest").read_text() == "step0000012"  # DeepSpeed's pointer, for its own tools
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


# --------------------------------------------------------------------------- node-local storage


def _node_local(d, root, drop_on_node1, orphan=False):
    """Each rank is a node with its own disk (root/nodeR); rank 0's storage alone holds markers. ``orphan``: what a
    prune a kill interrupted leaves of an older checkpoint: on node 0 its emptied directory (no marker), on node 1
    its copy (rank 0's node had deleted its own)."""
    from dwmtrain.distributed import Dist

    node = Dist(d.rank, d.world, 0, 1, d.device, "cpu")  # local rank 0 on its own node
    ck, eng = checkpointer(node, Path(root) / f"node{d.rank}"), ShardEngine(d.rank)
    if orphan:
        ck.rd.checkpoint("step0000001").mkdir(parents=True)
        if d.rank == 1:
            (ck.rd.checkpoint("step0000001") / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"x")
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


@pytest.mark.parametrize("orphan", [False, True])
def test_node_local_storage_rank0_decides_every_node_prunes_and_resumes(tmp_path, orphan):
    (k0, r0, _), (k1, r1, _) = run_distributed(_node_local, str(tmp_path), "none", orphan)
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


# DeepSpeed 0.19's names in a checkpoint of 4 ranks as tensor parallel 2 x data parallel 2 under ZeRO-1: the model
# states once per tensor-parallel rank (by data-parallel rank 0), an optimizer shard per rank
TP_FILES = ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_0_mp_rank_01_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_01_optim_states.pt"]  # fmt: skip


def test_shard_layout_names_each_ranks_files_by_data_and_tensor_parallel_rank(tmp_path):
    from dwmtrain.rundir import RunDir, ShardLayout

    rd, tag = RunDir(tmp_path), "step0000004"
    for f in [*TP_FILES, *(f"rng/rank{r}.pt" for r in range(4))]:
        (rd.checkpoint(tag) / f).parent.mkdir(parents=True, exist_ok=True)
        (rd.checkpoint(tag) / f).write_bytes(b"x" * (1 + len(f)))
    tp = ShardLayout.of({"zero_stage": 1, "tensor_parallel": 2})
    owned = [sorted(k for k in rd.rank_files(tag, r, tp) if not k.startswith("rng")) for r in range(4)]
    # each rank needs its tensor-parallel rank's model states (written once, by data-parallel rank 0: every rank
    # loads them) and its own optimizer shard
    assert owned == [[TP_FILES[0], TP_FILES[2]], [TP_FILES[1], TP_FILES[3]], [TP_FILES[0], TP_FILES[4]],
                     [TP_FILES[1], TP_FILES[5]]]  # fmt: skip
    assert all(not rd.missing_rank_files(tag, r, tp) for r in range(4))
    (rd.checkpoint(tag) / TP_FILES[3]).unlink()
    assert rd.missing_rank_files(tag, 1, tp) == [str(rd.checkpoint(tag) / "*zero_pp_rank_0_mp_rank_01_optim_states.pt")]
    (rd.checkpoint(tag) / TP_FILES[1]).unlink()  # a node that does not see the model states: rank 3 lacks them too
    assert rd.missing_rank_files(tag, 3, tp) == [str(rd.checkpoint(tag) / TP_FILES[1])]
    assert rd.missing_rank_files(tag, 0)  # read as ZeRO-3 this checkpoint lacks rank 0's zero_pp_rank_0_* model shard


def test_a_tensor_parallel_checkpoint_is_not_resumed_at_another_world_size_or_layout(tmp_path):
    """Saved by 4 ranks as TP 2 x DP 2 (ZeRO-1); resumed by 1 rank: refused with the reason, the files kept. A
    changed layout at the same world size is a breaking config change."""
    from dwmtrain.checkpoint import Checkpointer, RunState, check_compatible
    from dwmtrain.distributed import Dist
    from dwmtrain.errors import ResumeError
    from dwmtrain.rundir import RunDir, ShardLayout

    rd, tag = RunDir(tmp_path), "step0000004"
    saved = {**COMPAT, "world_size": 4, "zero_stage": 1, "tensor_parallel": 2}
    for f in [*TP_FILES, *(f"rng/rank{r}.pt" for r in range(4))]:
        (rd.checkpoint(tag) / f).parent.mkdir(parents=True, exist_ok=True)
        (rd.checkpoint(tag) / f).write_bytes(b"x")
    state = RunState(step=4, stage=2, consumed_samples=128, compat=saved, config_sha256=COMPAT["config_sha256"])
    files = {str(r): rd.rank_files(tag, r, ShardLayout(1, 2)) for r in range(4)}  # what the save recorded
    rd.marker(tag).write_text(json.dumps({**state.to_marker(), "files": files}))
    d = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu", tp=1)
    ck = Checkpointer(rd, d, compat={**saved, "world_size": 1}, global_batch_size=32)
    with pytest.raises(ResumeError, match=r"saved by 4 ranks with ZeRO-1 and tensor parallelism 2: resuming on 1 "):
        ck.resume(ShardEngine(0))
    assert sorted(p.name for p in rd.checkpoint(tag).glob("*.pt")) == sorted(TP_FILES)
    # a marker that does not record the layout is not guessed at: the checkpoint is refused, naming the field
    old = {k: v for k, v in saved.items() if k not in ("zero_stage", "tensor_parallel")}
    rd.marker(tag).write_text(json.dumps({**state.to_marker(), "files": files, "compat": {**old, "world_size": 1}}))
    ck = Checkpointer(rd, d, compat={**old, "world_size": 1, "zero_stage": 2, "tensor_parallel": 1},
                      global_batch_size=32)  # fmt: skip
    with pytest.raises(ResumeError, match=r"its COMPLETE marker is not sound \(field compat.zero_stage missing\)"):
        ck.resume(ShardEngine(0))
    with pytest.raises(ResumeError, match=r"deepspeed.tensor_parallel_size \(how each matrix is split\): checkpoint "
                                          r"has 2, now 1"):  # fmt: skip
        check_compatible(saved, {**saved, "tensor_parallel": 1, "zero_stage": 3})


def test_complete_files_are_complete_checkpoints_and_dwms_only(tmp_path):
    from dwmtrain.rundir import RunDir

    rd = RunDir(tmp_path)
    for tag, done in (("step00000002", True), ("step00000004", False)):
        (rd.checkpoint(tag) / "global_step2").mkdir(parents=True)
        (rd.checkpoint(tag) / "global_step2" / "shard.pt").write_text("x")
        if done:
            rd.marker(tag).write_text("")
    rd.dwm_dir.mkdir()
    rd.dwm(2).write_text("w")
    rd.dwm(2).with_name(rd.dwm(2).name + ".json").write_text("{}")
    rd.dwm(3).write_text("w")  # its sidecar not written yet: not complete
    names = [str(f.relative_to(tmp_path)) for f in rd.complete_files()]
    assert names == ["checkpoints/step00000002/COMPLETE", "checkpoints/step00000002/global_step2/shard.pt",
                     "dwm/stage2.safetensors.json", "dwm/stage2.safetensors"]  # fmt: skip
    assert rd.complete_files(["step00000004"])[0].name == "shard.pt"  # the tags another view knows


def test_a_leftover_removed_by_another_node_at_once_is_not_an_error(tmp_path, monkeypatch):
    """Two nodes' local rank 0 clear the same unfinished save on shared storage (the SLURM chaos soak: one
    rank's rmtree failed on a file the other had removed): a file already gone is fine, other errors are not."""
    import os

    from dwmtrain.fileio import remove_tree

    tree = tmp_path / "step0000008"
    tree.mkdir()
    for name in ("a.pt", "b.pt"):
        (tree / name).write_bytes(b"x")
    real = os.unlink

    def racing(path, *a, **kw):  # the other node got there first
        real(path, *a, **kw)
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(os, "unlink", racing)
    remove_tree(tree)
    assert not tree.exists()
    monkeypatch.setattr(os, "unlink", real)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "f").write_bytes(b"x")

    def refused(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "unlink", refused)
    with pytest.raises(PermissionError):
        remove_tree(tmp_path / "locked")
