"""One tensor-parallel rank: a process that holds its shard of the model and its share of the
paged KV cache, and runs every step the driver sends.

Start-up: join the ``torch.distributed`` rendezvous (the default group carries the model's
collectives: gloo on CPUs, NCCL on GPUs; a gloo group carries the control messages), take the
engine settings from rank 0, read the weights (or take the driver's, shared), build the shard,
size the KV cache and agree on the smallest block count of all ranks. Rank 0 reports the
model's facts to the driver over its pipe.

Steps: rank 0 receives each ``ModelInput`` from the driver and broadcasts it to the others on
the control group (so ranks on other machines get it as the local ones do); every rank runs it;
rank 0 answers with the logits and the time spent communicating. A ``None`` step stops all.
Rank 0 stops when the driver's pipe closes (the driver died); the others then see their
collective fail and stop too, and every rank stops when its parent process goes.

A step that raises on any rank ends that rank (after reporting the error on its pipe): the ranks
would otherwise disagree on which collectives come next, and wait on each other for ever. Its
peers' collectives then fail, and the driver sees a rank gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

from pagedserve.config import EngineConfig
from pagedserve.model.executor import ModelFacts, model_facts
from pagedserve.model.loader import load_model
from pagedserve.model.parallel import CommStats, ParallelGroup, check_tensor_parallel
from pagedserve.model.registry import build_model
from pagedserve.model.runner import ModelRunner, num_kv_blocks

# The control group waits for the driver's next step: a server may sit idle for days.
CONTROL_TIMEOUT = timedelta(days=365)
# The model's collectives wait only for the peers' share of the same layer, and the rendezvous
# for the other nodes to start: past this, a rank is stuck, not slow.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class Rendezvous:
    """Where and how the ranks meet: ``torch.distributed``'s TCP rendezvous."""

    init_method: str  # tcp://MASTER_ADDR:MASTER_PORT
    world_size: int
    nnodes: int
    backend: str  # of the model's collectives: "gloo" (CPU) or "nccl" (CUDA)

    @property
    def local_world_size(self) -> int:
        return self.world_size // self.nnodes


def rendezvous(world_size: int, nnodes: int, device: str) -> Rendezvous:
    """Where the ranks meet: on one node, loopback and a free port of its own (engines in one
    process, or a cluster's ``MASTER_PORT`` set for something else, must not share a store);
    across nodes, ``MASTER_ADDR`` and ``MASTER_PORT``, which must be set."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if nnodes == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return Rendezvous(f"tcp://127.0.0.1:{port}", world_size, nnodes, backend)
    addr = os.environ.get("MASTER_ADDR")
    port_text = os.environ.get("MASTER_PORT")
    if not (addr and port_text):
        raise ValueError(f"nnodes={nnodes} needs MASTER_ADDR and MASTER_PORT set to the head "
                         "node's address and a free port on it")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"MASTER_PORT must be a port number, got {port_text!r}")
    return Rendezvous(f"tcp://{addr}:{port_text}", world_size, nnodes, backend)


@dataclass(frozen=True)
class SharedModel:
    """A driver's weights in memory, handed to its local ranks (torch.multiprocessing shares the
    tensors, it does not copy them)."""

    config: PretrainedConfig
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class StepReply:
    """Rank 0's answer to a step: the logits of the sampling chunks."""

    seq_ids: list[int]
    logits: Any  # numpy [len(seq_ids), vocab] fp32: pickled by value, not as shared memory
    comm_ns: int


def threads_per_rank(local_world_size: int) -> int:
    """This node's CPUs shared out among its ranks: the CPUs this process may run on, or
    ``OMP_NUM_THREADS`` where set (a container's CPU limit, which affinity does not show)."""
    cpus = os.environ.get("OMP_NUM_THREADS", "")
    total = int(cpus) if cpus.isdigit() and int(cpus) > 0 else len(os.sched_getaffinity(0))
    return max(1, total // local_world_size)


def _watch_parent() -> None:
    """Exits this process when its parent goes (killed, crashed): no orphaned ranks."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start(rdv: Rendezvous, rank: int, config: EngineConfig | None,
           shared: SharedModel | None) -> tuple[ModelRunner, ModelFacts, ParallelGroup, Any]:
    local_rank = rank % rdv.local_world_size
    torch.set_num_threads(threads_per_rank(rdv.local_world_size))
    dist.init_process_group(rdv.backend, init_method=rdv.init_method, rank=rank,
                            world_size=rdv.world_size, timeout=COLLECTIVE_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    box: list[Any] = [config]
    dist.broadcast_object_list(box, src=0, group=control)
    base: EngineConfig = box[0]
    # Each rank takes its share of the engine's cache budget, so the block count is the one
    # device's: kv_cache_bytes is the engine's total, the fraction of free memory this node's.
    config = replace(
        base, device=f"cuda:{local_rank}" if base.device.startswith("cuda") else base.device,
        kv_cache_bytes=(None if base.kv_cache_bytes is None
                        else max(1, base.kv_cache_bytes // rdv.world_size)),
        kv_cache_memory_fraction=base.kv_cache_memory_fraction / rdv.local_world_size)
    if config.device.startswith("cuda"):
        torch.cuda.set_device(config.device)
    if shared is not None:
        hf_config, weights = shared.config, shared.weights
    else:
        loaded = load_model(config.model, config.device, config.torch_dtype)
        hf_config, weights = loaded.config, loaded.weights
    check_tensor_parallel(hf_config, rdv.world_size)
    group = ParallelGroup(rank, rdv.world_size, dist.group.WORLD, CommStats())
    model = build_model(hf_config, weights, config.torch_dtype, config.device, parallel=group,
                        quantization=config.quantization)
    # This process's references to the whole tensors (its own copy of the dict, even of
    # shared ones): the shard keeps what it needs, and the cache is sized after they go.
    weights.clear()
    # Free memory is read once every rank of this node has let its full weights go.
    dist.barrier(group=control)
    blocks = torch.tensor([num_kv_blocks(model, config)], dtype=torch.long)
    dist.all_reduce(blocks, op=dist.ReduceOp.MIN, group=control)
    runner = ModelRunner(model, int(blocks.item()), config.block_size,
                         config.attention_backend, cache_dtype=config.kv_cache_torch_dtype)
    return runner, model_facts(model, hf_config, int(blocks.item())), group, control


def run_worker(rdv: Rendezvous, rank: int, pipe: Connection | None,
               config: EngineConfig | None, shared: SharedModel | None) -> None:
    """A rank's process: start, then run steps until told to stop or a peer is gone.

    ``pipe`` talks to the driver (every local rank reports a start-up failure on it; rank 0
    also carries the steps); ``config`` is rank 0's, the others receive it.
    """
    _watch_parent()
    # Ctrl-C reaches the whole process group: the driver decides (a server drains first), and
    # stops the ranks itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runner, facts, group, control = _start(rdv, rank, config, shared)
        if rank == 0:
            assert pipe is not None
            pipe.send(("ready", facts))
            _lead(runner, group, control, pipe)
        else:
            _follow(runner, control)
    except BaseException as e:
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.send(("failed", f"{type(e).__name__}: {e}"))
        raise
    dist.destroy_process_group()


def _lead(runner: ModelRunner, group: ParallelGroup, control: Any, pipe: Connection) -> None:
    while True:
        try:
            step = pipe.recv()
        except EOFError:  # the driver is gone
            step = None
        start = time.perf_counter_ns()
        dist.broadcast_object_list([step], src=0, group=control)
        sent_ns = time.perf_counter_ns() - start
        if step is None:
            return
        before = group.stats.ns
        out = runner.execute(step)
        pipe.send(("step", StepReply(out.seq_ids, out.logits.cpu().numpy(),
                                     sent_ns + group.stats.ns - before)))


def _follow(runner: ModelRunner, control: Any) -> None:
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=control)
        if box[0] is None:
            return
        runner.execute(box[0])


def run_node(rdv: Rendezvous, node_rank: int) -> int:
    """``python -m pagedserve worker``: runs this node's ranks of an engine whose driver runs on
    node 0, until they end; returns the first failing rank's exit code (0 when all stop)."""
    if not 0 < node_rank < rdv.nnodes:
        raise ValueError(f"node_rank must be between 1 and nnodes - 1 = {rdv.nnodes - 1} "
                         f"(node 0 runs the engine), got {node_rank}")
    ctx = torch.multiprocessing.get_context("spawn")
    first = node_rank * rdv.local_world_size
    processes = [ctx.Process(target=run_worker, args=(rdv, first + i, None, None, None),
                             name=f"pagedserve-tp{first + i}", daemon=True)
                 for i in range(rdv.local_world_size)]
    for p in processes:
        p.start()
    code = 0
    pending: dict[Any, Any] = {p.sentinel: p for p in processes}
    while pending and code == 0:
        for sentinel in wait(list(pending)):
            process = pending.pop(sentinel)
            process.join()
            code = code or (process.exitcode or 0)
    for p in pending.values():
        p.terminate()
        p.join()
    return code
