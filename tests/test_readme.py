"""The README is a user's guide that stays true: short, every `alignsearch` command in it names a subcommand and
options the real parser has, the commands in its shell blocks parse as written and the cheap ones run, its
Python examples compile, and its links lead somewhere. The docs/ pages get the same option check."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from alignsearch.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_LINES = 250
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"`(alignsearch [^`\n]*)`")
SEPARATORS = {"&&", "||", "|", ";", "&"}
HELP = {"-h", "--help"}


def _fenced(text: str, *languages: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def _shell_commands(block: str) -> list[list[str]]:
    """The `alignsearch` command lines of a shell block, as argv lists without the program name: continuation
    lines joined, comments dropped, pipelines and `&&` chains split, leading VAR=value assignments skipped."""
    commands = []
    pending = ""  # a quoted string that runs on over lines (a JSON body) is one line to the shell
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # no closing quotation yet
            continue
        pending = ""
        piece: list[str] = []
        for word in [*words, ";"]:
            if word not in SEPARATORS:
                piece.append(word)
                continue
            while piece and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", piece[0]):
                piece.pop(0)
            if piece and piece[0] == "alignsearch":
                commands.append(piece[1:])
            piece = []
    assert not pending, f"a quotation never closes in: {pending[:80]!r}"
    return commands


def _inline_commands(text: str) -> list[list[str]]:
    """`alignsearch ...` in inline code outside fenced blocks (the tables): synopses with [optional] parts."""
    prose = FENCE.sub("", text)
    return [span.replace("[", " ").replace("]", " ").split()[1:] for span in INLINE.findall(prose)]


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def problems(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """What in ``argv`` the parser does not have: an unknown subcommand, or an option no parser on the
    subcommand's path takes (an option of ``alignsearch`` itself would come before the subcommand)."""
    path, current = ["alignsearch"], parser
    rest = list(argv)
    while rest and (sub := _subparsers(current)) is not None and not rest[0].startswith("-"):
        word = rest.pop(0)
        if word not in sub.choices:
            return [f"`{' '.join(path)}` has no subcommand {word!r} (it has {', '.join(sub.choices)})"]
        path.append(word)
        current = sub.choices[word]
    if _subparsers(current) is not None and not (set(rest) & HELP):
        return [f"`{' '.join(path)}` needs a subcommand"]
    options = {s for action in current._actions for s in action.option_strings}
    return [f"`{' '.join(path)}` has no option {word.split('=', 1)[0]}" for word in rest
            if word.startswith("-") and word.split("=", 1)[0] not in options]


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _readme_shell_commands() -> list[list[str]]:
    return [argv for block in _fenced(_readme(), "bash", "sh", "shell") for argv in _shell_commands(block)]


def test_readme_is_a_short_guide():
    lines = _readme().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}: details go to docs/)"


def test_readme_has_the_quality_table_between_its_markers():
    text = _readme()
    start, end = text.index("<!-- quality-table -->"), text.index("<!-- /quality-table -->")
    table = [line for line in text[start:end].splitlines() if line.startswith("|")]
    assert len(table) >= 3 and "rsum" in table[0]  # header, rule, at least one row


def test_readme_shows_commands_to_check():
    commands = _readme_shell_commands()
    subcommands = {argv[0] for argv in commands if argv}
    assert {"demo", "index", "serve"} <= subcommands, subcommands


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_command_names_real_subcommands_and_options(path):
    text = path.read_text(encoding="utf-8")
    commands = [argv for block in _fenced(text, "bash", "sh", "shell") for argv in _shell_commands(block)]
    commands += _inline_commands(text)
    parser = build_parser()
    found = [f"{shlex.join(['alignsearch', *argv])}: {p}" for argv in commands for p in problems(parser, argv)]
    assert not found, "\n".join(found)


def test_shell_commands_parse_as_written_and_help_runs(capsys):
    """Each command of the README's shell blocks parses with the real parser (required options present,
    choices valid); a `--help` command runs for real, and so does the help of every subcommand named."""
    ran = set()
    for argv in _readme_shell_commands():
        if set(argv) & HELP:
            to_run = [argv]
        else:
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"`alignsearch {shlex.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")
            assert callable(args.func)
            to_run = []
        sub = [w for w in argv if not w.startswith("-")][:2]
        to_run.append([*sub[:2 if sub and sub[0] == "index" else 1], "--help"])
        for help_argv in to_run:
            if tuple(help_argv) in ran:
                continue
            ran.add(tuple(help_argv))
            with pytest.raises(SystemExit) as stop:
                main(help_argv)
            out = capsys.readouterr().out
            assert stop.value.code == 0 and out.startswith("usage: alignsearch"), help_argv
    assert ("--help",) in ran and ("index", "build", "--help") in ran


def test_the_check_catches_a_made_up_option_or_subcommand():
    parser = build_parser()
    assert problems(parser, ["index", "build", "--images", "x", "--out", "y"]) == []
    assert problems(parser, ["serve", "--port=8000"]) == []
    assert problems(parser, ["index", "build", "--images", "x", "--no-such-flag"]) == [
        "`alignsearch index build` has no option --no-such-flag"]
    assert problems(parser, ["serve", "--colour=blue"]) == ["`alignsearch serve` has no option --colour"]
    assert problems(parser, ["index", "rebuild", "x"])[0].startswith("`alignsearch index` has no subcommand")
    assert problems(parser, ["index"]) == ["`alignsearch index` needs a subcommand"]
    # a shell line as the README writes it: comments, continuation, chains, variables
    line = "FOO=1 alignsearch demo --no-serve && alignsearch serve \\\n --index i  # --bogus\n"
    assert _shell_commands(line) == [["demo", "--no-serve"], ["serve", "--index", "i"]]


def test_python_examples_compile():
    blocks = _fenced(_readme(), "python")
    assert blocks
    for block in blocks:
        compile(block, "README.md", "exec")


@pytest.mark.parametrize("path", [README, REPO / "CONTRIBUTING.md", *DOCS],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_files(path):
    text = path.read_text(encoding="utf-8")
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)]
    missing = [t for t in targets if t and "://" not in t and not (path.parent / t).exists()]
    assert not missing, missing
