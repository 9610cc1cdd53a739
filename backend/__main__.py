"""Command line: ``python -m pagedserve generate "prompt"`` and ``python -m pagedserve serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    from pagedserve import LLM, SamplingParams

    llm = LLM(args.model, kv_cache_bytes=args.kv_cache_mb * 2**20,
              tensor_parallel_size=args.tensor_parallel_size, nnodes=args.nnodes,
              quantization=args.quantization,
              speculative_config=None if args.speculative_ngram is None else {
                  "method": "ngram", "num_speculative_tokens": args.speculative_ngram})
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                max_tokens=args.max_tokens, seed=args.seed)
        if args.chat:
            outputs = llm.chat([{"role": "user", "content": args.prompt}], params,
                               use_tqdm=False)
        else:
            outputs = llm.generate([args.prompt], params, use_tqdm=False)
    finally:
        llm.shutdown()
    print(outputs[0].outputs[0].text)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from pagedserve.model.worker import rendezvous, run_node

    world = args.tensor_parallel_size
    if world < 1 or args.nnodes < 2 or world % args.nnodes:
        raise ValueError(f"--tensor-parallel-size ({world}) must be a positive multiple of "
                         f"--nnodes ({args.nnodes}), and --nnodes at least 2")
    return run_node(rendezvous(world, args.nnodes, args.device), args.node_rank)


def _add_parallel(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks (processes, GPUs) the model is split over (default 1)")
    parser.add_argument("--nnodes", type=int, default=1,
                        help="machines the ranks are spread over; this one is node 0, the "
                             "others run 'worker' (MASTER_ADDR, MASTER_PORT: the rendezvous)")


def _triton(args: argparse.Namespace) -> int:
    from pagedserve.python_backend.host import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    # The same commands as the ``pagedserve`` console script (pyproject.toml).
    prog = "pagedserve" if Path(sys.argv[0]).name == "pagedserve" else "python -m pagedserve"
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["bench"]:  # every flag after it is pagedserve.bench.throughput's own
        from pagedserve.bench.throughput import main as throughput

        return throughput(arguments[1:])
    parser = argparse.ArgumentParser(prog=prog)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="print a completion of a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None,
                     help="Hugging Face directory or .gguf file (default: embedded SmolLM2)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the model's chat template")
    gen.add_argument("--kv-cache-mb", type=int, default=512)
    gen.add_argument("--quantization", choices=["int8", "int4", "gguf"], default=None,
                     help="weight-only quantization of the projections (CPU)")
    gen.add_argument("--speculative-ngram", type=int, default=None, metavar="K",
                     help="speculative decoding of greedy requests: K draft tokens a step by "
                          "prompt lookup (vLLM's ngram method)")
    _add_parallel(gen)
    gen.set_defaults(run=_generate)
    worker = commands.add_parser("worker", help="run this node's tensor-parallel ranks of an "
                                                "engine started on node 0 (--nnodes > 1)")
    _add_parallel(worker)
    worker.add_argument("--node-rank", type=int, required=True,
                        help="this node's number, 1 to nnodes - 1")
    worker.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="as the engine's: gloo collectives on CPUs, NCCL on GPUs")
    worker.set_defaults(run=_worker)
    srv = commands.add_parser("serve", help="serve a model repository over Triton's gRPC protocol")
    from pagedserve.server.cli import add_arguments
    from pagedserve.server.cli import run as serve_run

    add_arguments(srv)
    srv.set_defaults(run=serve_run)
    commands.add_parser("bench", help="offline engine throughput: pagedserve.bench.throughput, "
                                      "with its flags (bench --help)")
    triton = commands.add_parser("triton", help="real tritonserver (the nvidia-pytriton wheel's) "
                                                "serving a repository with our backend")
    from pagedserve.python_backend.host import add_arguments as triton_arguments

    triton_arguments(triton)
    triton.set_defaults(run=_triton)
    args = parser.parse_args(arguments)
    try:
        return int(args.run(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
