"""Which cleaned texts are kept: not empty, within the word limits, and the first of their duplicates."""

from yoso.data.journeydb.cleaning import clean_prompt


def dedupe_key(cleaned):
    """Fixed-size key of a cleaned prompt, equal for prompts that differ only in case or whitespace.

    Python's 64-bit string hash (SipHash): ~70 bytes a key in a set, and for JourneyDB's 1.6 M prompts
    the odds that two different prompts share a key are about 1 in 10 million.
    """
    # Cleaned prompts already have single spaces; casefold also folds "ß" and "STRASSE".
    return hash(cleaned.casefold())


class PromptFilter:
    """Cleans raw texts and keeps the first occurrence of each that passes; ``dropped`` counts the rest
    under ``empty``, ``too_few_words``, ``too_many_words`` and ``duplicate``."""

    def __init__(self, min_words, max_words, dropped):
        self.min_words = min_words
        self.max_words = max_words
        self.dropped = dropped
        self.seen = set()
        # Exact repeats of raw text are common (JourneyDB has ~2.7 images per prompt): a repeat of a raw
        # text that was kept is a duplicate without cleaning it again. Keys are 64-bit hashes, as in ``seen``.
        self.kept_raw = set()

    def keep(self, raw):
        """The cleaned text if it is kept, else None (and the reason counted)."""
        dropped = self.dropped
        raw_key = hash(raw)
        if raw_key in self.kept_raw:
            dropped["duplicate"] += 1
            return None
        cleaned = clean_prompt(raw)
        if not cleaned:
            dropped["empty"] += 1
            return None
        words = cleaned.count(" ") + 1
        if words < self.min_words:
            dropped["too_few_words"] += 1
            return None
        if self.max_words is not None and words > self.max_words:
            dropped["too_many_words"] += 1
            return None
        key = dedupe_key(cleaned)
        if key in self.seen:
            dropped["duplicate"] += 1
            return None
        self.seen.add(key)
        self.kept_raw.add(raw_key)
        return cleaned


def kept_prompts(texts, prompt_filter):
    """The cleaned texts that ``prompt_filter`` keeps, in order."""
    keep = prompt_filter.keep
    for raw in texts:
        cleaned = keep(raw)
        if cleaned is not None:
            yield cleaned


def kept_prompts_with_images(pairs, prompt_filter):
    """``(cleaned text, image file name)`` for each ``(raw text, image file name)`` pair whose text is kept."""
    keep = prompt_filter.keep
    for raw, file_name in pairs:
        cleaned = keep(raw)
        if cleaned is not None:
            yield cleaned, file_name
