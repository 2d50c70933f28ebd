"""Command-line plumbing that every layer's subcommands share: the help formatter (each option with its
default), one-line errors (argparse's own and a command's), and the cheap path checks a command makes before it
imports anything heavy. Imports no layer of alignsearch, so any of them may use it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

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


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and all its subcommands' parsers, each once (an alias names the same parser)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from parsers(child)


def use_formatter(parser: argparse.ArgumentParser, formatter: type = HelpFormatter) -> None:
    """Give ``parser`` and all its subcommands' parsers ``formatter``."""
    for each in parsers(parser):
        each.formatter_class = formatter


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make a wrong command line (a missing or unknown option, a bad value) answer in one line on stderr, as
    ``PROG: error: MESSAGE (see --help)``, and exit with status 2, for ``parser`` and every subcommand's parser,
    instead of argparse's usage block first."""
    for each in parsers(parser):
        each.error = _one_line_error(each)


def _one_line_error(parser: argparse.ArgumentParser):
    def error(message: str) -> NoReturn:
        parser.exit(EXIT_ERROR, f"{parser.prog}: error: {' '.join(str(message).split())} (see --help)\n")

    return error


def require_folder(path: Path, what: str) -> Path:
    """``path`` if it is a folder; otherwise an error saying which ``what`` ("images folder") is missing.
    A stat call, no import: commands call it before loading any model or index library."""
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} is a file, not a folder: {path}")
    raise FileNotFoundError(f"{what} not found: {path}")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file; otherwise an error saying which ``what`` ("captions file") is missing."""
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{what} is a folder, not a file: {path}")
    raise FileNotFoundError(f"{what} not found: {path}")


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
