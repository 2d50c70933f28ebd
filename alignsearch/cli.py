"""The ``alignsearch`` command: one entry point above every layer, one subcommand per stage of the data flow.

Building the parser imports no heavy library (torch, transformers, FAISS, FastAPI): each command imports what it
needs when it runs, so ``--help`` answers at once. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import shlex
import sys

from .console import one_line_errors, run_command, use_formatter


def build_parser() -> argparse.ArgumentParser:
    from alignsearch.indexer.cli import add_eval_parser, add_index_parser
    from alignsearch.models.cli import add_combine_parser, add_train_parser

    from alignsearch.service.demo import add_demo_parser
    from alignsearch.service.serve import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="alignsearch",
        description="Fine-grained image-text search: region-word alignment over a two-stage FAISS index. "
                    "Start with `alignsearch demo`, or `alignsearch index build` then `alignsearch serve`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_combine_parser(sub)
    add_eval_parser(sub)
    add_index_parser(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)
    try:
        from alignsearch.bench.cli import add_bench_parser
    except ImportError:  # the benchmarks ship with the source tree
        pass
    else:
        add_bench_parser(sub)
    use_formatter(parser)
    one_line_errors(parser)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``command_line`` records it as typed (bench writes it into its results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["alignsearch", *argv])
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's); returns the exit status."""
    return run_command(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
