"""The one user-facing error type and the CLI conventions around it.

Anything the user can fix (a missing file, a bad flag, a shape that does not fit) raises
`DSparkError` with a one-line message naming the culprit; command-line entry points turn
it into `error: <message>` on stderr and exit status 2, with no traceback. Every
command's `--help` uses `DefaultsFormatter`, which prints each option's default once.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys


class DSparkError(Exception):
    """A problem with the user's input, described in one line."""


EXIT_USAGE = 2


@contextlib.contextmanager
def cli_errors(prog: str):
    """Run a CLI body; DSparkError becomes one line on stderr and exit status 2."""
    try:
        yield
    except DSparkError as e:
        msg = " ".join(str(e).split())
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


def default_text(action: argparse.Action) -> str | None:
    """How `--help` shows an option's default, or None when there is nothing to show:
    flags, required options, positionals, and defaults of None or an empty list (their
    help says in words what happens without them). A list shows its items space-separated."""
    if not action.option_strings or action.required or action.nargs == 0:
        return None
    value = action.default
    if value is None or value is argparse.SUPPRESS:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value))
    text = str(value)
    return text or None


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse help that ends each option's line with `(default: X)`.

    An option whose help already mentions a default (in words, e.g. "default: the
    drafter's") keeps its help as written, so no default is printed twice; options without
    a help text still show their default. The description and epilog keep their line
    breaks (they come from module docstrings)."""

    def _format_action(self, action):
        shown = default_text(action)
        if shown is not None and not (action.help and action.help.strip()):
            action = copy.copy(action)  # a help-less option: its default is its help
            action.help = f"(default: {shown.replace('%', '%%')})"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        shown = default_text(action)
        if shown is not None and "default" not in text.lower():
            text += f" (default: {shown.replace('%', '%%')})"
        return text
