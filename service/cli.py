"""The ``alignsearch`` command: one entry point, one subcommand per stage of the data flow."""

from __future__ import annotations

import argparse
import sys

from models.data import DatasetError


def build_parser() -> argparse.ArgumentParser:
    from indexer.cli import add_eval_parser, add_index_parser
    from models.cli import add_train_parser

    from .demo import add_demo_parser
    from .serve import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="alignsearch",
        description="Fine-grained image-text search: region-word alignment over a two-stage FAISS index.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub)
    add_eval_parser(sub)
    add_index_parser(sub)
    add_serve_parser(sub)
    add_demo_parser(sub)
    try:
        from bench.cli import add_bench_parser
    except ImportError:  # the benchmarks ship with the source tree
        pass
    else:
        add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, NotADirectoryError, DatasetError, ValueError, RuntimeError, ImportError,
            OSError) as exc:
        print(f"alignsearch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
