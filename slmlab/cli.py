"""Shared CLI wrapper: user errors become one line on stderr and exit status 2."""
from __future__ import annotations

import errno
import re
import signal
import sys

from .errors import SlmlabError

# Filesystem failures a user can act on: one line naming the path and what to do, not a traceback.
FS_HINTS = {errno.EROFS: "the file system is read-only: choose another location",
            errno.EACCES: "permission denied: check the directory's permissions or choose another location",
            errno.EPERM: "not permitted: check the directory's permissions or choose another location",
            errno.ENOSPC: "no space left on the device: free some or choose another location",
            errno.EDQUOT: "disk quota exceeded: free some space or choose another location",
            errno.ENOTDIR: "a part of the path is a file, not a directory",
            errno.EISDIR: "a directory stands where a file is expected",
            # mkdir(parents=True, exist_ok=True) of a path that exists as a file (--out under a file)
            errno.EEXIST: "a file stands where a directory is expected"}


def run_cli(main, argv=None) -> int:
    """main(argv)'s exit status: the int it returns (sample.py's 130 after Ctrl-C mid-generation),
    0 for anything else it returns, 2 for a user error, 130 for Ctrl-C (143 for a SIGTERM the
    trainer caught)."""
    try:
        rc = main(argv)
    except SlmlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in FS_HINTS:
            raise
        # Name what was being written, not publish()'s temporary (.tmp-NAME-PID-ID).
        where = re.sub(r"\.tmp-(.+)-\d+-[0-9a-f]{8}$", r"\1", str(e.filename)) if e.filename else "a file"
        print(f"error: {where}: {FS_HINTS[e.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # The trainer's Stopped (a KeyboardInterrupt) says where to resume and which signal it was.
        print(str(e) or "interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return rc if type(rc) is int else 0  # mains may return results (a summary dict): those exit 0
