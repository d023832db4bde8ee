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
        follow_umask(tmp)  # some writers (safetensors) create their files 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def current_umask():
    """The process's umask (read by setting and restoring it: os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path):
    """Give ``path`` (a file, or a folder and everything in it) the permissions a plain ``open()`` /
    ``mkdir()`` would: 0666 / 0777 less the umask. safetensors writes its files 0600, and temporary folders
    are made 0700; the outputs of a run are then readable by whom the user's umask says, like every other file."""
    path = Path(path)
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
