"""Ranks and their process group (no model code here, and no rank logic in models).

ranks.py        where a process sits (Dist), joining the group, CPU threads per rank
collectives.py  barrier, broadcasts, all-reduces, work on rank 0 that keeps the others in touch
peers.py        the roll call that names a rank lost from a failed collective
rendezvous.py   the rendezvous of ranks started by mpirun or srun
group.py        the group's timing (collective timeout, keep-alive)
"""

from dwmtrain.distributed.collectives import (
    RankZeroError,
    all_gather_object,
    all_gather_rows,
    all_reduce_,
    all_reduce_grads,
    barrier,
    broadcast_object,
    broadcast_tensors,
    run_on_rank0,
)
from dwmtrain.distributed.peers import PeerLost, is_peer_failure, peer_lost
from dwmtrain.distributed.ranks import Dist, RendezvousError, cpu_threads, init_distributed, skip_cpu_inference_op

__all__ = ["Dist", "PeerLost", "RankZeroError", "RendezvousError", "all_gather_object", "all_gather_rows",
           "all_reduce_", "all_reduce_grads", "barrier", "broadcast_object", "broadcast_tensors", "cpu_threads",
           "init_distributed", "is_peer_failure", "peer_lost", "run_on_rank0", "skip_cpu_inference_op"]  # fmt: skip
