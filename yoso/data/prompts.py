"""Prompts: reading the prompt file, and the order in which each rank sees them.

The order is a pure function of (seed, epoch, rank, world size), so a run resumed from a checkpoint
sees exactly the batches the uninterrupted run would have seen: the position to resume from is just
the number of batches already consumed.
"""

import json
from pathlib import Path

import torch


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message is one line naming the file and the fix."""


def shuffled_subset(num_items, max_samples, seed):
    """The rows ``--max_train_samples`` keeps, in their order: diffusers' ``dataset.shuffle(seed=seed)
    .select(range(max_samples))`` (datasets permutes with ``numpy.random.default_rng(seed)``), so every
    data route keeps a random subset, the same for the same seed, not the file's first rows."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(num_items)
    return [int(i) for i in order[:max_samples]] if max_samples is not None else [int(i) for i in order]


def read_prompts(path, caption_column="prompt", max_samples=None, seed=0):
    """Prompts from ``path``, by its extension:

    - ``.jsonl``: one JSON object a line, the text in ``caption_column``;
    - ``.json``: one JSON list, of objects (text in ``caption_column``) or of strings, as JourneyDB ships
      some annotations;
    - anything else: plain text, one prompt a line. A text file whose first line is JSON (``[``, ``{``, an
      object) is refused rather than trained on as text.

    Blank lines and empty texts are skipped; a malformed record is an error naming its line or item.
    ``max_samples`` (``--max_train_samples``) keeps that many prompts drawn with ``seed`` (:func:`shuffled_subset`)."""
    path = Path(path)
    caption_column = caption_column or "prompt"
    if not path.is_file():
        raise PromptFileError(f"--train_data {path}: no such file (make one with prepare_journeydb.py)")
    try:
        if path.suffix == ".json":
            prompts = _read_json_list(path, caption_column)
        else:
            prompts = _read_lines(path, caption_column)
    except UnicodeDecodeError as error:
        raise PromptFileError(f"--train_data {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not prompts:
        raise PromptFileError(f"--train_data {path}: no prompts in the file")
    if max_samples is not None and max_samples < len(prompts):
        prompts = [prompts[i] for i in shuffled_subset(len(prompts), max_samples, seed)]
    return prompts


def _record_text(record, caption_column, where):
    if not isinstance(record, dict) or caption_column not in record:
        raise PromptFileError(f"--train_data {where}: no {caption_column!r} field (set --caption_column)")
    return str(record[caption_column]).strip()


def _read_lines(path, caption_column):
    prompts = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        for line_number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise PromptFileError(f"--train_data {path}:{line_number}: malformed JSON ({error.msg})") from None
                text = _record_text(record, caption_column, f"{path}:{line_number}")
            else:
                if not prompts and _looks_like_json(line):
                    raise PromptFileError(
                        f"--train_data {path}: line {line_number} is JSON ({line[:40]!r}), not a prompt: name the file "
                        ".jsonl (an object a line) or .json (a list), or convert it with prepare_journeydb.py")
                text = line
            if text:
                prompts.append(text)
    return prompts


def _looks_like_json(line):
    """A line that opens a JSON list or object, or is one: text files must not be read as prompts then."""
    if line in ("[", "{") or line.startswith(("[{", '["', "[[")):
        return True
    if line[0] in "[{":
        try:
            return isinstance(json.loads(line), (dict, list))
        except json.JSONDecodeError:
            return False
    return False


def _read_json_list(path, caption_column):
    text = path.read_text(encoding="utf-8", errors="strict")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise PromptFileError(f"--train_data {path}: malformed JSON at line {error.lineno} ({error.msg}); a .json file "
                              "must hold one list (of records or of strings); one record a line is .jsonl") from None
    if not isinstance(data, list):
        kind = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise PromptFileError(f"--train_data {path}: holds {kind}, not a JSON list of records or strings; "
                              "convert it with prepare_journeydb.py")
    prompts = []
    for item_number, item in enumerate(data, start=1):
        if isinstance(item, str):
            text = item.strip()
        else:
            text = _record_text(item, caption_column, f"{path} item {item_number}")
        if text:
            prompts.append(text)
    return prompts


class ShardedPromptSampler:
    """Batches of prompt indices for one rank: every epoch a fresh permutation (seeded by seed + epoch),
    cut into global batches of ``batch_size * world_size``; rank r takes its slice of each.

    The incomplete last global batch of an epoch is dropped so that every rank runs the same number of
    steps (a rank waiting on a collective that another rank never reaches would hang).
    """

    def __init__(self, num_prompts, batch_size, world_size=1, rank=0, seed=0):
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = num_prompts // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise PromptFileError(
                f"--train_data holds {num_prompts} prompts, fewer than one global batch "
                f"({batch_size} x {world_size} processes): lower --train_batch_size or add prompts"
            )

    def epoch_order(self, epoch):
        """The epoch's permutation of all prompt indices; its batches are consecutive slices of it."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_prompts, generator=generator)

    def epoch_batches(self, epoch):
        order = self.epoch_order(epoch)
        global_size = self.batch_size * self.world_size
        for b in range(self.batches_per_epoch):
            start = b * global_size + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()

    def batches(self, start_batch=0):
        """Yield ``(epoch, batch_in_epoch, indices)`` forever, starting after ``start_batch`` batches."""
        epoch, offset = divmod(start_batch, self.batches_per_epoch)
        while True:
            for b, indices in enumerate(self.epoch_batches(epoch)):
                if b >= offset:
                    yield epoch, b, indices
            epoch, offset = epoch + 1, 0


def tokenize_prompts(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def prompt_batches(prompts, tokenizer, sampler, start_batch=0):
    """Training batches ``{"prompts", "input_ids", "indices", "epoch"}`` for one rank, forever, starting
    after ``start_batch`` batches. Tokenized in the loop, without worker threads or a DataLoader: CLIP-tokenizing
    a batch of 16 prompts takes 6-8 ms on one loaded shared CPU core (benchmarks/bench_data_machinery.py), about 1%
    of the fastest measured step (H200, batch 16: 0.73 s), so a pool had next to nothing to hide (it was removed; docs/development.md, "Libraries vs own
    code")."""
    for epoch, _, indices in sampler.batches(start_batch=start_batch):
        batch_prompts = [prompts[i] for i in indices]
        yield {"prompts": batch_prompts, "input_ids": tokenize_prompts(tokenizer, batch_prompts),
               "indices": indices, "epoch": epoch}
