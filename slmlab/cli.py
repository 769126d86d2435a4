"""Shared CLI wrapper: user errors become one line on stderr and exit status 2."""
from __future__ import annotations

import sys

from .errors import SlmlabError


def run_cli(main, argv=None) -> int:
    try:
        main(argv)
    except SlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
