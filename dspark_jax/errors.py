"""The one user-facing error type and the CLI convention around it.

Anything the user can fix (a missing file, a bad flag, a shape that does not fit) raises
`DSparkError` with a one-line message naming the culprit; command-line entry points turn
it into `error: <message>` on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import contextlib
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
