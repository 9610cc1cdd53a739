"""Where a decode step's time goes at small batches: the host's share against the kernels'.

A decode step at batch 1 or 8 is short, so what surrounds the kernels (Python, dispatch,
allocation, scheduling, sampling, detokenizing) can be a large part of it. This benchmark runs
the embedded model's decode steps and then the same steps on a *skeleton* of it: the same
architecture, layer count, head count, vocabulary and tokenizer, with every width cut to a few
values, so its kernels do next to no work while the engine and the model issue exactly the same
calls. The skeleton's step time is the host overhead; the model's minus it is kernel time.

Each step is split by the engine's own phase records (``StepStats``): schedule, forward (input
tensors, layers, logits), sample, output (stop checks, detokenizing).

Usage (from the repository root)::

    python -m pagedserve.bench.step_overhead [--batches 1 8] [--quantization int4] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pagedserve import SamplingParams
from pagedserve.bench.cpu_steal import ContentionMonitor
from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCore
from pagedserve.engine.stats import FinishedRequest, RequestInfo, StepStats
from pagedserve.model.loader import LoadedModel, load_model
from pagedserve.model.projections import GGUF, as_blocks

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
PHASES = ("schedule", "forward", "sample", "output")


@dataclass
class StepProfile:
    model: str
    quantization: str | None
    batch: int
    steps: int
    step_ms: float  # median decode step, wall
    phase_ms: dict[str, float]  # medians per phase


class _PhaseRecorder:
    """An engine observer that keeps the phase durations of pure decode steps."""

    def __init__(self) -> None:
        self.steps: list[StepStats] = []

    def on_request_added(self, request: RequestInfo) -> None:
        pass

    def on_step(self, stats: StepStats) -> None:
        if stats.num_prefill_tokens == 0:
            self.steps.append(stats)

    def on_request_finished(self, request: FinishedRequest) -> None:
        pass

    def shutdown(self) -> None:
        pass


def skeleton_of(loaded: LoadedModel, folder: Path) -> LoadedModel:
    """``loaded``'s architecture with random weights and every width cut to a few values."""
    config = AutoConfig.for_model(**loaded.config.to_dict())
    # Grouped heads stay grouped; widths stay multiples of 32, the quantized kernels' blocks.
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 8
    config.hidden_size = config.intermediate_size = 32
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return load_model(str(folder))


def in_blocks(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with its projections held as Q4_1 blocks, as a GGUF read for
    ``quantization="gguf"`` holds them."""
    return replace(loaded, weights=as_blocks(loaded.weights, lambda name: "q4_1"),
                   quantization=GGUF)


def profile(loaded: LoadedModel, name: str, quantization: str | None, batch: int,
            tokens: int, fused: bool = True) -> StepProfile:
    """Median decode step of ``batch`` requests; ``fused=False`` runs a block-quantized
    model's decode layers one operation at a time (pagedserve.model.fused_decode off)."""
    recorder = _PhaseRecorder()
    engine = EngineCore(EngineConfig(kv_cache_bytes=256 * 2**20, quantization=quantization,
                                     enable_prefix_caching=False), loaded, [recorder])
    if not fused:
        engine.model.fused_decode = None  # type: ignore[attr-defined]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    try:
        for run in range(2):  # the first run warms up
            recorder.steps.clear()
            for i in range(batch):
                engine.add_request(engine.make_request(f"{run}-{i}", PROMPT, params))
            while engine.has_unfinished_requests:
                engine.step()
    finally:
        engine.shutdown()
    steps = [s for s in recorder.steps if s.num_decode_tokens == batch]
    bounds = [("start_ns", "scheduled_ns"), ("scheduled_ns", "forwarded_ns"),
              ("forwarded_ns", "sampled_ns"), ("sampled_ns", "end_ns")]
    phase_ms = {phase: statistics.median((getattr(s, b) - getattr(s, a)) / 1e6 for s in steps)
                for phase, (a, b) in zip(PHASES, bounds)}
    step_ms = statistics.median((s.end_ns - s.start_ns) / 1e6 for s in steps)
    return StepProfile(name if fused else f"{name}/ops", quantization, batch, len(steps), step_ms,
                       phase_ms)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--quantization", nargs="+", default=["none", "int4"],
                        help="'none' for the model's dtype; 'gguf' for the file's own blocks")
    parser.add_argument("--tokens", type=int, default=64, help="generated per request")
    parser.add_argument("--per-operation", action="store_true",
                        help="run gguf's decode layers one operation at a time, not fused")
    parser.add_argument("--out", type=Path, default=Path("bench/results/step_overhead.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_model(None)
    rows: list[StepProfile] = []
    monitor = ContentionMonitor()
    with tempfile.TemporaryDirectory() as folder:
        skeleton = skeleton_of(loaded, Path(folder))
        for quantization in [None if q == "none" else q for q in args.quantization]:
            # "gguf" runs the file's own blocks, and its skeleton blocks of the same format.
            sources = ((("model", load_model(None, quantization=GGUF)),
                        ("skeleton", in_blocks(skeleton))) if quantization == GGUF
                       else (("model", loaded), ("skeleton", skeleton)))
            for batch in args.batches:
                for name, source in sources:
                    rows.append(profile(source, name, quantization, batch, args.tokens,
                                        fused=not args.per_operation))
    others = monitor.stop().others_fraction_of_machine
    print(f"{'quantization':>12} {'batch':>5} {'system':>12} {'step ms':>8} "
          + " ".join(f"{p:>9}" for p in PHASES))
    for row in rows:
        print(f"{row.quantization or 'none':>12} {row.batch:>5} {row.model:>12} "
              f"{row.step_ms:>8.2f} " + " ".join(f"{row.phase_ms[p]:>9.2f}" for p in PHASES))
    for full, bare in zip(rows[::2], rows[1::2]):
        print(f"{full.quantization or 'none'} batch {full.batch}: host overhead "
              f"{bare.step_ms:.2f} of {full.step_ms:.2f} ms per step "
              f"({bare.step_ms / full.step_ms:.0%})")
    if others is not None:
        print(f"CPU taken by other processes: {others:.0%} of the machine")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"time": time.time(), "other_cpu": others,
                                    "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
