"""Draws docs/images/trace.png: one request's trace and the engine steps it rode.

Runs the embedded SmolLM2 offline, its engine reporting to an OpenTelemetry tracer provider
with an in-memory exporter, on a small workload that shows what the spans record: requests
arriving between steps, a prefix-cache hit, a preemption (the KV cache is kept small) and an
abort. Then draws, with matplotlib, a Gantt chart of the ``llm_request`` spans (their events as
markers) above the ``engine.step`` spans (their four phase children side by side in colour),
lines for the span links between the steps and the highlighted request, the KV blocks each step
left in use, and one of the highlighted request's steps drawn at full scale with its attributes.

    .venv/bin/python docs/render_trace.py [--out docs/images/trace.png] [--highlight ID]
                                          [--num-blocks N] [--threads N]

The workload is deterministic (greedy sampling, fixed lengths, the engine stepped by hand), so
the same steps, preemption and prefix-cache hits come back every run; only the times vary with
the machine.

matplotlib is a tool of the docs, not a dependency of the server: install it into the venv
(``.venv/bin/pip install matplotlib``) to run this script.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import matplotlib
except ImportError:
    sys.exit("docs/render_trace.py draws with matplotlib, which is not installed (it is a "
             "docs tool, not a dependency of pagedserve). Install it into the venv:\n"
             "    .venv/bin/pip install matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's backend

from pagedserve import EngineConfig, SamplingParams
from pagedserve.engine.core import EngineCore
from pagedserve.engine.tracing import EngineTracer, TraceSettings
from pagedserve.model.loader import load_model

ROOT = Path(__file__).resolve().parent.parent

PHASES = ("schedule", "forward", "sample", "output")
PHASE_COLOURS = {"schedule": "#f2a541", "forward": "#3b75af", "sample": "#8cc084",
                 "output": "#c44e52"}
ACCENT = "#7b3fb0"  # the highlighted request
IDLE = "#f2f2f2"  # a request alive but not in the step
MARKER_SIZE = {"o": 9, "|": 16, "*": 15, "X": 11, "s": 9, "D": 9}
FOCUS_ATTRIBUTES = (
    "engine.step", "engine.requests.running", "engine.requests.waiting",
    "engine.requests.preempted", "engine.batch.prefill_tokens", "engine.batch.decode_tokens",
    "engine.batch.sequences", "engine.batch.generated_tokens", "engine.kv_blocks.used",
    "engine.kv_blocks.free", "engine.prefix_cache.queried_tokens",
    "engine.prefix_cache.hit_tokens")
# Event name -> (marker, colour, label in the legend).
EVENT_STYLE = {
    "queued": ("o", "#555555", "queued (arrival)"),
    "first_scheduled": ("|", "#222222", "first_scheduled"),
    "first_token": ("*", "#e3a008", "first_token"),
    "preempted": ("X", "#d62728", "preempted"),
    "finished": ("s", "#2ca02c", "finished"),
    "aborted": ("D", "#111111", "aborted"),
}

SYSTEM = ("You are a concise assistant for the operators of a language model server. The server "
          "keeps the keys and values of every request in fixed-size blocks of a paged cache, "
          "schedules all running requests together in one batch per step, and answers over "
          "Triton's gRPC protocol. Answer in two sentences at most.\n\n")


@dataclass
class Arrival:
    """What the workload does before a step: add requests, abort one."""

    add: list[tuple[str, str, int]] = field(default_factory=list)  # id, prompt, max_tokens
    abort: list[str] = field(default_factory=list)


# Once n steps have run: these requests arrive (or are aborted). "ops-3" shares "ops-1"'s long
# system prompt, so the prefix cache serves most of its prompt; the cache is sized so that, as
# the running requests grow, the newest of them ("ops-3") is preempted, waits until "ops-1"
# ends, and is recomputed, again partly from the prefix cache.
NUM_BLOCKS = 13
WORKLOAD: dict[int, Arrival] = {
    0: Arrival(add=[("ops-1", SYSTEM + "What does a preemption cost?", 40),
                    ("ops-2", "List three uses of a paged KV cache:", 48)]),
    3: Arrival(add=[("ops-3", SYSTEM + "Why do two requests share blocks?", 48)]),
    6: Arrival(add=[("cancelled", "Write a long story about a lighthouse keeper.", 200)]),
    12: Arrival(abort=["cancelled"]),
    16: Arrival(add=[("late", "Name a prime number greater than 100:", 6)]),
}


def run_workload(num_blocks: int, threads: int) -> list[ReadableSpan]:
    """Runs the workload on a traced engine; returns the finished spans."""
    torch.set_num_threads(threads)
    loaded = load_model()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = EngineTracer(provider, TraceSettings("TIMESTAMPS", rate=1), "smollm2", "1")
    c = loaded.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    block_size = 16
    block_bytes = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 4 * block_size
    core = EngineCore(EngineConfig(block_size=block_size, kv_cache_bytes=num_blocks * block_bytes,
                                   dtype="float32", device="cpu"), loaded, observers=[tracer])
    step = 0
    while core.has_unfinished_requests or step <= max(WORKLOAD):
        todo = WORKLOAD.get(step)
        if todo is not None:
            for request_id, prompt, max_tokens in todo.add:
                params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                core.add_request(core.make_request(request_id, prompt, params))
            for request_id in todo.abort:
                core.abort(request_id)
        core.step()
        step += 1
    core.shutdown()
    return list(exporter.get_finished_spans())


# ---- drawing ---------------------------------------------------------------------------


@dataclass
class Trace:
    """The spans of one run, indexed for drawing."""

    requests: list[ReadableSpan]  # llm_request spans, by start time
    steps: list[ReadableSpan]  # engine.step spans, by step number
    phases: dict[int, dict[str, ReadableSpan]]  # step span id -> phase name -> child span
    rode: dict[int, list[ReadableSpan]]  # request span id -> the step spans linked to it
    origin: int  # ns of the first span's start: time zero of the chart

    @classmethod
    def of(cls, spans: Sequence[ReadableSpan]) -> Trace:
        requests = sorted((s for s in spans if s.name == "llm_request"),
                          key=lambda s: s.start_time or 0)
        steps = sorted((s for s in spans if s.name == "engine.step"),
                       key=lambda s: _attr(s, "engine.step"))
        phases: dict[int, dict[str, ReadableSpan]] = {}
        for s in spans:
            if s.name.startswith("engine.step.") and s.parent is not None:
                phases.setdefault(s.parent.span_id, {})[s.name.rsplit(".", 1)[1]] = s
        rode: dict[int, list[ReadableSpan]] = {}
        for step in steps:
            for link in step.links:
                rode.setdefault(link.context.span_id, []).append(step)
        return cls(requests, steps, phases, rode, min(s.start_time or 0 for s in spans))

    def s(self, ns: int | None) -> float:
        """Seconds since the chart's time zero."""
        return ((ns or 0) - self.origin) / 1e9


def _attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {})[name]


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def _pick(trace: Trace, highlight: str | None) -> ReadableSpan:
    """The request to highlight: the one named, else one preempted that finished."""
    by_id = {_attr(s, "gen_ai.request.id"): s for s in trace.requests}
    if highlight is not None:
        if highlight not in by_id:
            sys.exit(f"no llm_request span has gen_ai.request.id {highlight!r}; "
                     f"there are {', '.join(by_id)}")
        return by_id[highlight]
    return next((s for s in trace.requests
                 if {"preempted", "finished"} <= {e.name for e in s.events}),
                trace.requests[0])


def _focus_step(trace: Trace, chosen: ReadableSpan) -> ReadableSpan:
    """The step drawn at full scale: the first one after the request's preemption (it
    resumes, its prompt mostly from the prefix cache), else its first step."""
    rode = trace.rode[_id(chosen)]
    preempted = [e.timestamp for e in chosen.events if e.name == "preempted"]
    if preempted:
        later = [s for s in rode if (s.start_time or 0) > preempted[0]]
        if later:
            return later[0]
    return rode[0]


def render(spans: Sequence[ReadableSpan], highlight: str | None, out: Path,
           subtitle: str) -> None:
    trace = Trace.of(spans)
    chosen = _pick(trace, highlight)
    chosen_id = _attr(chosen, "gen_ai.request.id")
    rode = trace.rode.get(_id(chosen), [])
    focus = _focus_step(trace, chosen)

    fig = plt.figure(figsize=(14, 9.4), dpi=100)
    left = 0.125
    top_grid = fig.add_gridspec(2, 1, height_ratios=[4.3, 1.0], hspace=0.06, left=left,
                                right=0.975, top=0.875, bottom=0.38)
    bottom_grid = fig.add_gridspec(1, 3, width_ratios=[1.45, 1.0, 0.62], wspace=0.06,
                                   left=left, right=0.975, top=0.285, bottom=0.055)
    ax = fig.add_subplot(top_grid[0])
    kv = fig.add_subplot(top_grid[1], sharex=ax)
    zoom = fig.add_subplot(bottom_grid[0])
    notes = fig.add_subplot(bottom_grid[1])
    legend = fig.add_subplot(bottom_grid[2])
    fig.text(0.012, 0.972, f"One request's trace: llm_request {chosen_id!r} and the "
             f"engine.step spans linked to it", fontsize=15, fontweight="bold", va="top")
    fig.text(0.012, 0.937, subtitle, fontsize=10.5, color="#444444", va="top")
    _draw_timeline(ax, trace, chosen, rode, focus)
    _draw_kv(kv, trace)
    _draw_focus(zoom, notes, trace, focus)
    _draw_legend(legend, chosen_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB): {chosen_id!r} rode {len(rode)} "
          f"of {len(trace.steps)} steps; step {_attr(focus, 'engine.step')} drawn in full")


def _draw_timeline(ax: Any, trace: Trace, chosen: ReadableSpan,
                   rode: list[ReadableSpan], focus: ReadableSpan) -> None:
    """A row per llm_request span, the engine.step row under them, links as lines."""
    n = len(trace.requests)
    step_y = n + 0.4
    for row, span in enumerate(trace.requests):
        mine = span is chosen
        start, end = trace.s(span.start_time), trace.s(span.end_time)
        ax.barh(row, end - start, left=start, height=0.56, color=IDLE,
                edgecolor=ACCENT if mine else "#8f8f8f", linewidth=1.6 if mine else 0.8,
                zorder=1)
        for step in trace.rode.get(_id(span), []):
            ax.barh(row, trace.s(step.end_time) - trace.s(step.start_time),
                    left=trace.s(step.start_time), height=0.56,
                    color=ACCENT if mine else "#b4b4b4", linewidth=0, zorder=2)
        for event in span.events:
            marker, colour, _ = EVENT_STYLE.get(event.name, ("o", "black", event.name))
            ax.plot(trace.s(event.timestamp), row, marker=marker, color=colour,
                    markersize=MARKER_SIZE[marker], markeredgewidth=2.5 if marker == "|" else 1,
                    markeredgecolor=colour if marker == "|" else "white", linestyle="none",
                    zorder=5)
    # The step spans, each split into its phase children (at this scale forward fills it).
    for step in trace.steps:
        for name, child in trace.phases.get(_id(step), {}).items():
            ax.barh(step_y, trace.s(child.end_time) - trace.s(child.start_time),
                    left=trace.s(child.start_time), height=0.8, color=PHASE_COLOURS[name],
                    linewidth=0, zorder=2)
        ax.barh(step_y, trace.s(step.end_time) - trace.s(step.start_time),
                left=trace.s(step.start_time), height=0.8, fill=False, edgecolor="white",
                linewidth=0.7, zorder=3)
        number = _attr(step, "engine.step")
        if number == 1 or number % 10 == 0:
            ax.text(trace.s(step.start_time), step_y + 0.62, f"{number}", ha="left",
                    va="center", fontsize=8.5, color="#333333")
    # Span links: a line from each step that served the chosen request up to its row.
    row = next(i for i, s in enumerate(trace.requests) if s is chosen)
    for step in rode:
        middle = (trace.s(step.start_time) + trace.s(step.end_time)) / 2
        ax.plot([middle, middle], [step_y - 0.4, row + 0.28], color=ACCENT, alpha=0.4,
                linewidth=0.9, zorder=0)
    ax.barh(step_y, trace.s(focus.end_time) - trace.s(focus.start_time),
            left=trace.s(focus.start_time), height=1.05, fill=False, edgecolor="black",
            linewidth=1.8, zorder=4)
    labels = []
    for span in trace.requests:
        a = span.attributes or {}
        cached = a.get("gen_ai.usage.cached_tokens", 0)
        labels.append(f"{a['gen_ai.request.id']}\n{a['gen_ai.usage.prompt_tokens']} in, "
                      f"{a.get('gen_ai.usage.completion_tokens', 0)} out"
                      f"{f'{chr(10)}{cached} cached' if cached else ''}")
    ax.set_yticks([*range(n), step_y], [*labels, "engine.step\n(step number\nbelow)"],
                  fontsize=9.5)
    ax.get_yticklabels()[row].set_color(ACCENT)
    ax.get_yticklabels()[row].set_fontweight("bold")
    ax.set_ylim(step_y + 0.95, -0.6)
    ax.grid(axis="x", color="#e2e2e2", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(axis="x", labelbottom=False)
    ax.set_title("llm_request spans (filled where a step served the request) above the "
                 "engine.step spans; the thin lines are the span links to "
                 f"{_attr(chosen, 'gen_ai.request.id')!r}", fontsize=10.5, loc="left")


def _draw_kv(kv: Any, trace: Trace) -> None:
    """The steps' engine.kv_blocks.used under the same time axis: why the preemption came."""
    xs = [trace.s(s.start_time) for s in trace.steps]
    widths = [trace.s(s.end_time) - x for s, x in zip(trace.steps, xs)]
    used = [_attr(s, "engine.kv_blocks.used") for s in trace.steps]
    total = used[0] + _attr(trace.steps[0], "engine.kv_blocks.free")
    kv.bar(xs, used, width=widths, align="edge", color="#9fb8d6", edgecolor="white",
           linewidth=0.4)
    kv.axhline(total, color="#555555", linestyle="--", linewidth=1)
    kv.text(0.003, total + 0.5, f"{total} usable blocks", va="bottom", fontsize=8.5,
            color="#555555", transform=kv.get_yaxis_transform())
    for step, x in zip(trace.steps, xs):
        if _attr(step, "engine.requests.preempted"):
            kv.plot(x, total, marker="X", color=EVENT_STYLE["preempted"][1], markersize=10,
                    markeredgecolor="white")
            kv.annotate(f"step {_attr(step, 'engine.step')}: the cache is full, "
                        f"engine.requests.preempted = 1", (x, total), xytext=(8, 4),
                        textcoords="offset points", va="bottom", fontsize=8.5,
                        color=EVENT_STYLE["preempted"][1])
    kv.set_ylim(0, total * 1.45)
    kv.set_ylabel("KV blocks\nused", fontsize=9.5)
    kv.set_xlabel("seconds since the first request arrived", fontsize=10)
    kv.grid(axis="x", color="#e2e2e2", linewidth=0.6)
    kv.set_axisbelow(True)
    kv.set_xlim(-0.01 * xs[-1], (xs[-1] + widths[-1]) * 1.015)


def _draw_focus(zoom: Any, notes: Any, trace: Trace, focus: ReadableSpan) -> None:
    """The boxed step at full scale (the span and its four children) and its attributes."""
    phases = trace.phases.get(_id(focus), {})
    base = focus.start_time or 0
    visible = ((focus.end_time or 0) - base) / 1e6 * 0.008
    rows = [("engine.step", focus, "#555555")] + [
        (f"engine.step.{name}", phases[name], PHASE_COLOURS[name])
        for name in PHASES if name in phases]
    for row, (_, span, colour) in enumerate(rows):
        start = ((span.start_time or 0) - base) / 1e6
        width = ((span.end_time or 0) - (span.start_time or 0)) / 1e6
        shown = max(width, visible)  # the short phases, widened to be seen
        zoom.barh(row, shown, left=start, height=0.62, color=colour)
        zoom.annotate(f"{width:.2f} ms", (start + shown, row), xytext=(4, 0),
                      textcoords="offset points", va="center", fontsize=9)
    zoom.set_yticks(range(len(rows)), [name for name, _, _ in rows], fontsize=9.5)
    zoom.set_ylim(len(rows) - 0.45, -0.6)
    zoom.set_xlim(0, ((focus.end_time or 0) - base) / 1e6 * 1.2)
    zoom.set_xlabel("milliseconds since the step began", fontsize=10)
    zoom.grid(axis="x", color="#e2e2e2", linewidth=0.6)
    zoom.set_axisbelow(True)
    zoom.set_title(f"Step {_attr(focus, 'engine.step')} (boxed above) at full scale: "
                   "the span and its phase children", fontsize=10.5, loc="left")
    notes.axis("off")
    a = focus.attributes or {}
    lines = [f"{key.removeprefix('engine.')} = {a[key]}" for key in FOCUS_ATTRIBUTES
             if key in a]
    lines.append(f"links: {len(focus.links)} llm_request spans")
    notes.text(0.04, 1.0, f"Step {a.get('engine.step')}'s attributes (excerpt; engine. "
               "dropped)", fontsize=10.5, va="top",
               transform=notes.transAxes)
    notes.text(0.04, 0.86, "\n".join(lines), fontsize=9, va="top", family="monospace",
               linespacing=1.35, transform=notes.transAxes)


def _draw_legend(legend: Any, chosen_id: str) -> None:
    legend.axis("off")
    handles: list[Any] = [Patch(color=PHASE_COLOURS[p], label=f"engine.step.{p}")
                          for p in PHASES]
    handles += [Line2D([], [], marker=m, color=c, linestyle="none", label=label,
                       markersize=min(MARKER_SIZE[m], 11), markeredgewidth=2.2 if m == "|"
                       else 1)
                for m, c, label in EVENT_STYLE.values()]
    handles += [Patch(color=ACCENT, label=f"a step served {chosen_id}"),
                Patch(facecolor=IDLE, edgecolor="#8f8f8f", label="alive, not in the step")]
    legend.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, 1.08), fontsize=9,
                  frameon=False, handlelength=1.5, labelspacing=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "trace.png")
    parser.add_argument("--highlight", help="the request id to highlight (default: the "
                                            "preempted one)")
    parser.add_argument("--num-blocks", type=int, default=NUM_BLOCKS,
                        help=f"KV cache blocks, one of them reserved (default {NUM_BLOCKS})")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady step times on a busy machine)")
    args = parser.parse_args(argv)
    spans = run_workload(args.num_blocks, args.threads)
    subtitle = (f"SmolLM2-135M on CPU ({args.threads} thread{'s' if args.threads > 1 else ''}"
                f"), float32, {args.num_blocks - 1} KV blocks of 16 tokens · requests join "
                "between steps · ops-3 reuses ops-1's system prompt (prefix cache) · "
                "'cancelled' is aborted")
    render(spans, args.highlight, args.out, subtitle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
