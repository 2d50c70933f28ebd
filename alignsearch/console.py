"""Command-line plumbing that every layer's subcommands share: the help formatter (each option with its
default) and one-line error handling. Imports no layer of alignsearch, so any of them may use it."""

from __future__ import annotations

import argparse
import os
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


def _name(args: argparse.Namespace) -> str:
    return " ".join(filter(None, ["alignsearch", args.command, getattr(args, "index_command", None)]))


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
