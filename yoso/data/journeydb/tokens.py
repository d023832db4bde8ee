"""Exact CLIP token counts at dictionary speed, for the summary's "prompts over 77 tokens" figure."""

import json
import re
import unicodedata
from pathlib import Path

from yoso.data.clip_bpe import bytes_to_unicode

CLIP_MAX_TOKENS = 77

# CLIP's pre-tokenizer pattern as SD1.5's tokenizer has it, and its exact equivalent on lowercase ASCII
# text for the standard ``re`` module (three times faster than ``regex``, which is needed for \p{L}).
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_CLIP_SPLIT_ASCII = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


class ClipTokenCounter:
    """Exact CLIP token counts (start and end tokens included), fast enough for millions of prompts.

    The tokenizer's own call runs at a few thousand prompts a second on one core, mostly in its
    pre-tokenizer, and the ``tokenizers`` backend's ``encode_batch`` at about 12,000 (measured on 40,000
    JourneyDB-like prompts; this class: about 240,000, with its caches warm as in a run). But CLIP's pre-tokens (words, single digits, runs of punctuation) never span
    whitespace and its BPE works on each pre-token alone, so a prompt's count is 2 plus the counts of
    its whitespace-separated chunks. Each distinct chunk is counted once, with the tokenizer's own
    split pattern and BPE model, and remembered. Tests check the counts against
    ``len(tokenizer(text).input_ids)``.
    """

    max_cached_chunks = 1_000_000  # per cache, ~100 MB at most; a full cache starts over

    def __init__(self, tokenizer):
        import regex  # a dependency of transformers; stdlib ``re`` has no \p{L}

        backend = tokenizer.backend_tokenizer
        layout = json.loads(backend.to_str())
        pre_tokenizer = layout.get("pre_tokenizer") or {}
        steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer.get("type") == "Sequence" else []
        normalizers = [step.get("type") for step in (layout.get("normalizer") or {}).get("normalizers", [])]
        if (
            len(steps) != 2
            or steps[0].get("type") != "Split"
            or "Regex" not in steps[0].get("pattern", {})
            or steps[1].get("type") != "ByteLevel"
            or normalizers != ["NFC", "Replace", "Lowercase"]
        ):
            raise ValueError("not a CLIP tokenizer: its normalizer or pre-tokenizer differs from CLIP's")
        pattern = steps[0]["pattern"]["Regex"]
        self._split = regex.compile(pattern)
        # The ASCII shortcut only where the tokenizer's pattern is CLIP's: otherwise ``regex`` for all.
        self._split_ascii = _CLIP_SPLIT_ASCII if pattern == CLIP_SPLIT_PATTERN else self._split
        self._model = backend.model
        self._special_tokens = {tokenizer.bos_token, tokenizer.eos_token}
        byte_chars = bytes_to_unicode()
        self._byte_chars = [byte_chars[byte] for byte in range(256)]  # indexed by byte value
        self._cache = {}  # whitespace-separated chunk -> tokens
        self._piece_cache = {}  # pre-token -> tokens

    def _piece_count(self, piece):
        if piece in self._special_tokens:
            return 1
        if not piece.isascii():
            piece = "".join(self._byte_chars[byte] for byte in piece.encode("utf-8"))
        return len(self._model.tokenize(piece))

    def _chunk_count(self, chunk):
        if chunk.isascii():
            pieces = self._split_ascii.findall(chunk.lower())
        else:
            pieces = self._split.findall(unicodedata.normalize("NFC", chunk).lower())
        # Pieces repeat across chunks ("8k," "8k." share "8" and "k"): a second cache saves BPE calls.
        cache = self._piece_cache
        total = 0
        for piece in pieces:
            tokens = cache.get(piece)
            if tokens is None:
                if len(cache) >= self.max_cached_chunks:
                    cache.clear()
                tokens = cache[piece] = self._piece_count(piece)
            total += tokens
        return total

    def count(self, text):
        """Number of CLIP tokens ``text`` encodes to, start and end tokens included, before truncation."""
        cache = self._cache
        chunks = text.split()
        counts = list(map(cache.get, chunks))  # one C loop for the usual case: every chunk seen before
        if None in counts:
            for index, tokens in enumerate(counts):
                if tokens is None:
                    if len(cache) >= self.max_cached_chunks:
                        cache.clear()
                    counts[index] = cache[chunks[index]] = self._chunk_count(chunks[index])
        return 2 + sum(counts)


def load_clip_token_counter(pretrained_model_name_or_path=None):
    """A ``ClipTokenCounter`` for SD1.5's tokenizer: from a model folder or hub id (``tokenizer/``
    subfolder), or, without one, rebuilt offline from ``open_clip_torch``'s merge list (``yoso.data.clip_bpe``)."""
    if pretrained_model_name_or_path is None:
        from yoso.data.clip_bpe import make_clip_tokenizer

        tokenizer = make_clip_tokenizer()
    else:
        from transformers import CLIPTokenizer

        path = Path(pretrained_model_name_or_path)
        subfolder = "tokenizer" if not path.is_dir() or (path / "tokenizer").is_dir() else ""
        tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder)
    return ClipTokenCounter(tokenizer)

