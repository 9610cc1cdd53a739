"""The tensor-parallel executor's driver side: spawns this node's ranks and feeds rank 0.

Ranks are ``torch.multiprocessing`` processes (spawn context, as vLLM's multiprocessing
executor starts them), running ``pagedserve.model.worker.run_worker``. Every wait of the driver is
on rank 0's pipe *and* every rank's process sentinel, so a rank that dies (killed, crashed,
failed to load) raises ``ExecutorDied`` at once, naming its rank, pid and exit code, instead of
leaving the driver waiting for an answer that cannot come. After that the executor is dead:
the other ranks are stopped, and every later step raises the same error.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

import torch
from transformers import PretrainedConfig

from pagedserve.config import EngineConfig
from pagedserve.lora_request import LoRARequest
from pagedserve.model.batch import ModelInput, ModelOutput
from pagedserve.model.executor import ExecutorDied, ModelFacts
from pagedserve.model.loader import LoadedModel
from pagedserve.model.parallel import check_tensor_parallel
from pagedserve.model.worker import SharedModel, StepReply, rendezvous, run_worker

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # for ranks to finish after the stop message, before they are killed
EXIT_REPORT_TIMEOUT_S = 5.0  # for a rank whose pipe closed to be reaped, to report its code


def _exit_text(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class MultiprocExecutor:
    """``tensor_parallel_size`` ranks in worker processes (this node's share of them)."""

    def __init__(self, config: EngineConfig, hf_config: PretrainedConfig,
                 loaded: LoadedModel | None) -> None:
        world = config.tensor_parallel_size
        check_tensor_parallel(hf_config, world)  # refused here, before anything is spawned
        if loaded is not None and config.nnodes > 1:
            raise ValueError("weights passed in memory reach this node's ranks only: with "
                             f"nnodes={config.nnodes} pass a model path every node can read")
        rdv = rendezvous(world, config.nnodes, config.device)
        shared = None if loaded is None else SharedModel(loaded.config, loaded.weights)
        ctx = torch.multiprocessing.get_context("spawn")
        self._dead: str | None = None
        self._stopped = False
        self._reports: dict[int, str] = {}  # rank -> the error it reported before exiting
        self._processes: list[Any] = []
        self._pipes: list[Connection] = []
        # Every node's ranks run the dtype the driver chose, whatever "auto" means on theirs.
        config = replace(config, dtype=config.resolved_dtype)
        try:
            for rank in range(rdv.local_world_size):
                ours, theirs = ctx.Pipe()
                process = ctx.Process(target=run_worker,
                                      args=(rdv, rank, theirs, config if rank == 0 else None,
                                            shared),
                                      name=f"pagedserve-tp{rank}", daemon=True)
                self._pipes.append(ours)
                process.start()
                theirs.close()
                self._processes.append(process)
            log.info("tensor parallel: %d ranks (%s), pids %s", world, rdv.init_method,
                     ", ".join(str(p.pid) for p in self._processes))
            _, facts = self._receive("start-up")
        except BaseException:  # whatever failed the start, no rank outlives it
            self._stop_all()
            raise
        # The sampler runs here on the CPU: the driver takes no memory of the ranks' devices.
        self.facts: ModelFacts = replace(facts, device=torch.device("cpu"))

    @property
    def device(self) -> torch.device:
        return self.facts.device

    @property
    def worker_pids(self) -> list[int]:
        """This node's ranks' process ids, in rank order."""
        return [int(p.pid) for p in self._processes]

    def load_lora(self, request: LoRARequest) -> None:
        raise ValueError("LoRA adapters run on one rank (tensor_parallel_size 1)")

    def unload_lora(self, lora_id: int) -> None:
        pass  # none is ever loaded

    def execute(self, step: ModelInput) -> ModelOutput:
        if self._dead is not None:
            raise ExecutorDied(self._dead)
        try:
            self._pipes[0].send(step)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self._die_of_exit("a step")
        try:
            kind, reply = self._receive("a step")
        except ExecutorDied:
            raise
        except BaseException as e:
            # Interrupted between a step and its answer (Ctrl-C, a broken reply): the answer
            # would be read as the next step's, so the ranks cannot be used again.
            self._die(f"tensor-parallel step interrupted: {type(e).__name__}: {e}")
        assert kind == "step" and isinstance(reply, StepReply)
        return ModelOutput(reply.seq_ids,
                           torch.from_numpy(reply.logits).to(self.facts.device),
                           reply.comm_ns)

    def failure(self) -> str | None:
        """Never blocks and never reaps (any thread may ask): ``check`` does, on the thread
        that owns the ranks."""
        if self._dead is not None or self._stopped:
            return self._dead
        gone = wait([p.sentinel for p in self._processes], timeout=0)
        if not gone:
            return None
        rank = next(r for r, p in enumerate(self._processes) if p.sentinel in gone)
        return (f"tensor-parallel worker rank {rank} (pid {self._processes[rank].pid}) "
                "is gone")

    def check(self) -> None:
        """Raises ``ExecutorDied`` (stopping the other ranks) if a rank is gone: for the
        engine's thread while it has no step to run."""
        if self._dead is not None:
            raise ExecutorDied(self._dead)
        if not self._stopped and wait([p.sentinel for p in self._processes], timeout=0):
            self._die_of_exit("an idle wait")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._dead is None:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError, EOFError):
                self._pipes[0].send(None)
            self._join_all()
        self._stop_all()

    # ---- failure ---------------------------------------------------------------------------

    def _receive(self, phase: str) -> tuple[str, Any]:
        """Rank 0's next message, or ``ExecutorDied`` as soon as any rank is gone."""
        pipe = self._pipes[0]
        ready = wait([pipe, *(p.sentinel for p in self._processes)])
        if pipe in ready:
            try:
                message: tuple[str, Any] = pipe.recv()
                if message[0] != "failed":
                    return message
                # Its own error, or its collectives failing because another rank went first.
                self._reports[0] = message[1]
            except EOFError:
                pass
        self._die_of_exit(phase)

    def _die_of_exit(self, phase: str) -> NoReturn:
        """Names the rank that exited and dies of it."""
        sentinels = [p.sentinel for p in self._processes]
        gone = wait(sentinels, timeout=EXIT_REPORT_TIMEOUT_S) or sentinels[:1]
        self._die(self._describe(self._culprit(gone), phase))

    def _culprit(self, gone: list[Any]) -> int:
        """The rank most likely to have failed first among those gone: one killed by a signal,
        else one other than rank 0 (whose collectives fail when a peer goes), else rank 0."""
        ranks = [r for r, p in enumerate(self._processes) if p.sentinel in gone]
        for r in ranks:
            self._processes[r].join(EXIT_REPORT_TIMEOUT_S)
        killed = [r for r in ranks if (self._processes[r].exitcode or 0) < 0]
        return (killed or [r for r in ranks if r > 0] or ranks)[0]

    def _describe(self, rank: int, phase: str) -> str:
        """What happened to ``rank``, with the error it reported."""
        process = self._processes[rank]
        process.join(EXIT_REPORT_TIMEOUT_S)  # its sentinel closes just before it can be reaped
        text = (f"tensor-parallel worker rank {rank} (pid {process.pid}) "
                f"{_exit_text(process.exitcode)} during {phase}")
        pipe = self._pipes[rank]
        try:
            if rank > 0 and pipe.poll():  # rank 0's are read by _receive
                kind, reason = pipe.recv()
                if kind == "failed":
                    self._reports[rank] = reason
        except (EOFError, OSError):
            pass
        return text + (f": {self._reports[rank]}" if rank in self._reports else "")

    def _die(self, message: str) -> NoReturn:
        log.error("%s; stopping the other ranks", message)
        self._dead = message
        self._stop_all()
        raise ExecutorDied(message)

    def _join_all(self) -> None:
        """Waits for every rank to exit, all within one ``STOP_TIMEOUT_S``."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self._processes:
            p.join(max(0.0, deadline - time.monotonic()))

    def _stop_all(self) -> None:
        self._stopped = True
        for p in self._processes:
            if p.is_alive():
                p.terminate()
        self._join_all()
        for p in self._processes:
            if p.is_alive():
                p.kill()
                p.join()
        for pipe in self._pipes:
            pipe.close()
