"""The one exception type for mistakes a user can fix: the CLI prints it as one line, exit 2."""
from __future__ import annotations

import errno
import os
from typing import Optional


class UserError(Exception):
    """Bad input (config, file, architecture); the message names the problem in one line."""


# File-system faults the user (or the cluster admin) fixes, not the program.
FS_FAULTS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
             errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG, errno.ELOOP}


def one_line(exc: BaseException) -> str:
    """A UserError's own message, also when a DataLoader worker re-raised it with its traceback
    ("Caught UserError in DataLoader worker process 0. Original Traceback ...")."""
    text = str(exc)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        last = lines[-1] if lines else text
        return last.split("UserError: ", 1)[-1]
    return " ".join(text.split())


def fs_fault(exc: OSError) -> Optional[str]:
    """The one-line message for a file-system fault (path and cause), or None for other errors."""
    if exc.errno not in FS_FAULTS:
        return None
    where = exc.filename if exc.filename is not None else "a file"
    return f"cannot use {where}: {os.strerror(exc.errno).lower()}"
