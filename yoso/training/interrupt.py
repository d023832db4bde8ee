"""Stopping a training run cleanly on Ctrl-C (SIGINT) or a scheduler's SIGTERM, and saying what a full disk
left behind.

While the loop runs, a signal only records itself; the loop asks at the end of each optimizer step (a safe
point: the step's update is whole, no file is being written) and stops there. All processes of a run stop at
the same step: they agree through one small all-gather per step. A second signal, or one before the loop
starts (models still loading), stops at once with :class:`Interrupted`. Exit status: 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
"""

import errno
import shutil
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal; ``step``: the optimizer steps done when the loop stopped (None: not known)."""

    def __init__(self, signum, step=None):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step = signum, step

    @property
    def exit_code(self):
        return 128 + self.signum


class StopRequest:
    """``with StopRequest() as stop:`` catches SIGINT and SIGTERM (main thread only) until the block ends.
    While ``stop.defer`` is False a signal raises :class:`Interrupted` where the program is; while it is True
    (the training loop) the signal is recorded and ``stop.requested(accelerator)`` returns it; a second signal
    raises at once."""

    def __init__(self):
        self.signum = None
        self.defer = False
        self.step = None  # optimizer steps done, kept up to date by the loop (for the message)
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.defer and self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum, self.step)

    def requested(self, accelerator):
        """The signal any process of the run got (its number), or 0. Collective: every process calls it at
        the same point."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            import torch

            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max().item())
        return signum


def interrupt_message(step, checkpoint):
    """The one line a stopped run prints."""
    where = f"interrupted at step {step}" if step is not None else "interrupted before training started"
    if checkpoint is None:
        return f"{where}; nothing was saved (no checkpoint yet; --checkpoint_on_interrupt saves one when stopped)"
    return f"{where}; the last checkpoint is {checkpoint}; resume with --resume_from_checkpoint latest"


def is_disk_full(error):
    """Whether ``error`` (an OSError, or safetensors' error wrapping one) says the device is full."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def free_space(path):
    """Free bytes on the file system holding ``path`` (its nearest existing parent), as text: '1.2 MB'."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    for unit in ("bytes", "KB", "MB", "GB"):
        if free < 1000 or unit == "GB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1000
    return None


class DiskFullError(OSError):
    """Saving ``path`` ran out of space; what was half-written there has been removed."""

    def __init__(self, path):
        self.path = Path(path)
        super().__init__(errno.ENOSPC, f"no space left on the device while writing {self.path} ({free_space(path)} "
                                       "free there); the unfinished files were removed and earlier checkpoints are "
                                       "intact: free some space, then resume with --resume_from_checkpoint latest")
        self.filename = str(self.path)

    def __str__(self):
        return self.strerror
