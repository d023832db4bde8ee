"""Output folders that appear only when there is something to write into them.

A script checks its ``--output_dir`` up front (:func:`check_creatable`, which creates nothing), loads its
models, and creates the folder (:func:`make_output_dir`) just before the first file is written, so an error
on the way (a LoRA that does not fit, a model that cannot be downloaded) leaves no empty folder behind.
"""

import os
from pathlib import Path


class OutputDirError(ValueError):
    """An output folder that cannot be made; the message is one line naming the flag and the path."""


def check_creatable(path, flag="--output_dir"):
    """Raise :class:`OutputDirError` unless ``path`` is a folder or could be made one; creates nothing.

    Walks up to the nearest existing ancestor: it must be a writable folder (a file on the way, or a
    read-only parent, would only fail later, after the models are loaded)."""
    path = Path(path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise OutputDirError(f"{flag} {path} cannot be created: it is a file")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"{flag} {path} is not writable")
        return path
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(f"{flag} {path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"{flag} {path} cannot be created: {ancestor} is not writable")
    return path


def make_output_dir(path, flag="--output_dir"):
    """Create ``path`` (and its parents) now that something is about to be written there."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{flag} {path} cannot be created: {exc}") from exc
    return path
