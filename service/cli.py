"""The ``alignsearch`` command: one entry point, one subcommand per stage of the data flow.

Building the parser imports no heavy library (torch, transformers, FAISS, FastAPI): each command imports what it
needs when it runs, so ``--help`` answers at once. Errors are one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

EXIT_ERROR = 2


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help, unless the help already says it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default in (None, False, argparse.SUPPRESS) or "default" in text or "%(default)" in text
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {str(value).replace('%', '%%')})"


def use_formatter(parser: argparse.ArgumentParser, formatter: type = HelpFormatter) -> None:
    """Give ``parser`` and all its subcommands' parsers ``formatter``."""
    parser.formatter_class = formatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                use_formatter(child, formatter)


def build_parser() -> argparse.ArgumentParser:
    from indexer.cli import add_eval_parser, add_index_parser
    from models.cli import add_train_parser

    from .demo import add_demo_parser
    from .serve import add_serve_parser

    parser = argparse.ArgumentParser(
        prog="alignsearch",
        description="Fine-grained image-text search: region-word alignment over a two-stage FAISS index. "
                    "Start with `alignsearch demo`, or `alignsearch index build` then `alignsearch serve`.",
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
    use_formatter(parser)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``command_line`` records it as typed (bench writes it into its results)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["alignsearch", *argv])
    return args


def _name(args: argparse.Namespace) -> str:
    return " ".join(filter(None, ["alignsearch", args.command, getattr(args, "index_command", None)]))


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's); returns the exit status."""
    return run_command(parse(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: errors become one line on stderr and a non-zero status, never a traceback."""
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError, ImportError) as exc:  # DatasetError, IndexError_ are ValueErrors
        print(f"{_name(args)}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line, the traceback on request
        if os.environ.get("ALIGNSEARCH_DEBUG"):
            raise
        print(f"{_name(args)}: internal error: {type(exc).__name__}: {exc} "
              "(set ALIGNSEARCH_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
