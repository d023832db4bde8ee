"""What reading found: counts, the first malformed lines, problems with whole inputs; and the run's error.

Every reader reports here. Without ``--strict`` a bad line or an unreadable input is counted and listed
for the summary; with it, the first one raises ``InputError``.
"""

MAX_LISTED_PROBLEMS = 10  # malformed lines listed by position in the summary; the rest are only counted


class InputError(Exception):
    """A problem that stops the run; the message is one line that names the file or flag and the fix."""


class ReadReport:
    """Counts and problem lists gathered while reading; becomes the JSON summary."""

    def __init__(self, strict):
        self.strict = strict
        self.records_read = 0
        self.malformed = 0
        self.malformed_first = []
        self.inputs = []
        self.problems = []

    def add_input(self, path, kind):
        entry = {"path": str(path), "kind": kind, "records": 0, "malformed": 0}
        if kind == "tar":
            entry["jsonl_members"] = []
            entry["skipped_members"] = []
        self.inputs.append(entry)
        return entry

    def bad_line(self, entry, location, unit, position, reason):
        if self.strict:
            raise InputError(
                f"{location} {unit} {position}: {reason}; fix or delete that {unit}, or run without --strict to skip it"
            )
        self.malformed += 1
        entry["malformed"] += 1
        if len(self.malformed_first) < MAX_LISTED_PROBLEMS:
            self.malformed_first.append({"file": location, unit: position, "error": reason})

    def problem(self, entry, message, fix):
        if self.strict:
            raise InputError(f"{message}; {fix}")
        entry["error"] = message
        self.problems.append(message)
