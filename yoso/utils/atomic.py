"""Files that are either whole or absent: written under a temporary name beside the target, renamed
onto it only when the write succeeded. An interrupted run never leaves a half-written output."""

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """``with atomic_path(p) as tmp: write(tmp)`` -> ``p`` appears complete, or not at all.

    The temporary name keeps the extension (image and tensor writers look at it) and is created with the
    process's normal permissions (unlike ``mkstemp``'s 0600), so the final file is readable as usual."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
