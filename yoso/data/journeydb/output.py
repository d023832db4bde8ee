"""The output files: their default names, their line formats, and writing each whole or not at all.

``AtomicTextFile`` writes under a temporary name in the target's folder and renames on ``commit``; the
run commits all its files only once everything has succeeded.
"""

import json
import os
import secrets
from pathlib import Path

OUTPUT_SUFFIXES = (".jsonl", ".txt")


def default_val_file(output_file):
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + "_val.txt")


def default_summary_file(output_file):
    output_file = Path(output_file)
    return output_file.with_name(output_file.stem + ".summary.json")


class AtomicTextFile:
    """A UTF-8 text file written under a temporary name in its own folder and renamed on ``commit``.

    Until then a file already at ``path`` keeps its old content; ``discard`` removes the temporary
    file, so an interrupted or failed run leaves no half-written output.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.temp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        # Mode "x" creates the file with the usual umask permissions (mkstemp would give 0600).
        self.file = open(self.temp_path, "x", encoding="utf-8", newline="\n")
        self.committed = False

    def write(self, text):
        self.file.write(text)

    def commit(self):
        self.file.flush()
        os.fsync(self.file.fileno())  # the data is on disk before the name points at it
        self.file.close()
        os.replace(self.temp_path, self.path)
        self.committed = True

    def discard(self):
        """Remove the temporary file unless it was committed."""
        if self.committed:
            return
        self.file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def prompt_line_format(path):
    """How one prompt is written to ``path``: a JSON object a line (.jsonl) or the bare text (.txt)."""
    if Path(path).suffix.lower() == ".jsonl":
        dumps = json.dumps
        return lambda prompt: '{"prompt": ' + dumps(prompt, ensure_ascii=False) + "}\n"
    return lambda prompt: prompt + "\n"
