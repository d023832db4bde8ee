"""Midjourney prompts made fit for a CLIP text encoder: parameters, URLs, weights and stray separators out.

``clean_prompt`` is the one entry point; ``strip_midjourney_parameters`` is its parameter pass.
"""

import re

# Midjourney's own parameter names. With a plain ``--`` any name is a parameter; after an em or en
# dash (phone keyboards turn ``--`` into ``—``) only these are, so prose like "a cat —black" stays.
_NUMBER_PARAMETERS = {
    "ar", "aspect", "v", "version", "q", "quality", "s", "stylize", "c", "chaos", "seed", "sameseed",
    "iw", "stop", "w", "weird", "h", "cw", "sw", "sv", "ow", "r", "repeat", "niji", "exp",
}
_FLAG_PARAMETERS = {
    "tile", "hd", "test", "testp", "upbeta", "uplight", "upanime", "video", "fast", "relax", "turbo",
    "creative", "draft", "stealth", "public",
}
_REFERENCE_PARAMETERS = {"sref", "cref", "oref", "p", "personalize", "profile"}  # URLs and codes
_WORD_PARAMETERS = {"style"}  # one word: raw, 4a, cute, expressive, scenic ...
_LIST_PARAMETERS = {"no"}  # free text up to the next parameter: --no text, watermark, people
KNOWN_PARAMETERS = frozenset(
    _NUMBER_PARAMETERS | _FLAG_PARAMETERS | _REFERENCE_PARAMETERS | _WORD_PARAMETERS | _LIST_PARAMETERS
)

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
# A literal "--" first lets the regex engine jump between dashes; whether the dash run continues a word
# ("mid--century" is no parameter) is checked in ``_next_parameter``.
_PARAMETER = re.compile(r"--+([A-Za-z][A-Za-z_]*)")
# "—ar 9:16" as phone keyboards type it: rewritten to "--ar 9:16" when the name is Midjourney's own.
_DASHED_PARAMETER = re.compile(r"(?<![\w\-—–])[—–]+-*([A-Za-z][A-Za-z_]*)")
# One optional number or ratio ("5.2", ".5", "16:9", "-10"), also glued to the name ("--v5").
_NUMBER_VALUE = re.compile(rf"\s*{_NUMBER}(?:\s*:\s*{_NUMBER})?(?![\w.:])")
_REFERENCE_VALUE = re.compile(
    rf"\s+(?!-)(?:<?(?:https?://|www\.)[^\s>]+>?|[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*|random)(?:::{_NUMBER})?(?=\s|$)",
    re.IGNORECASE,
)
_WORD_VALUE = re.compile(r"\s+(?![\-—–])[^\s,]+")

_URL = re.compile(
    r"<?(?:https?://|www\.|s\.mj\.run/)[^\s<>]*[^\s<>.,;:!?)\]}'\"]>?",
    re.IGNORECASE,
)
_WEIGHT = re.compile(rf"::(?:{_NUMBER})?")  # multi-prompt weights: "castle::2 fog::-0.5", bare "::"
_IMAGINE_PREFIX = re.compile(r"^\s*/imagine\b\s*(?:prompt\b\s*:?)?", re.IGNORECASE)
_REPEATED_SEPARATORS = re.compile(r"([,;])[,;]+")
_EDGE_SEPARATORS = " ,;:|-–—"
_SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates from "\\ud83d" escapes cannot be written as UTF-8


def _next_parameter(text, pos):
    """The next ``--name`` match at or after ``pos`` whose dashes do not continue a word, or None."""
    while (match := _PARAMETER.search(text, pos)) is not None:
        start = match.start()
        if start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "_-"):
            return match
        pos = match.end()
    return None


def _dash_to_ascii(match):
    name = match.group(1)
    return "--" + name if name.lower() in KNOWN_PARAMETERS else match.group(0)


def _parameter_end(text, name, pos):
    """End of the value that follows parameter ``name`` (its name ends at ``pos``)."""
    if name in _LIST_PARAMETERS:
        following = _next_parameter(text, pos)
        return following.start() if following is not None else len(text)
    if name in _REFERENCE_PARAMETERS:
        while (match := _REFERENCE_VALUE.match(text, pos)) is not None:
            pos = match.end()
        return pos
    if name in _WORD_PARAMETERS:
        match = _WORD_VALUE.match(text, pos)
    else:
        # Midjourney's numeric parameters, the flags, and any other --name: at most one number or ratio.
        match = _NUMBER_VALUE.match(text, pos)
    return match.end() if match is not None else pos


def strip_midjourney_parameters(text):
    """Remove ``--name [value]`` parameters (and their ``—name`` spellings), keeping every other word.

    With ``--`` any name is a parameter; after an em or en dash only Midjourney's own names are, so
    prose such as "a cat —black and white" keeps its words.
    """
    if "—" in text or "–" in text:
        text = _DASHED_PARAMETER.sub(_dash_to_ascii, text)
    pieces = []
    keep_from = 0
    match = _next_parameter(text, 0)
    while match is not None:
        pieces.append(text[keep_from:match.start()])
        keep_from = _parameter_end(text, match.group(1).lower(), match.end())
        match = _next_parameter(text, keep_from)
    if not pieces:
        return text
    pieces.append(text[keep_from:])
    # A space where a parameter was, so the words on either side never glue together.
    return " ".join(pieces)


def clean_prompt(text):
    """A Midjourney prompt made fit for a CLIP text encoder; ``""`` when no words are left.

    Removes Midjourney parameters, URLs, ``::`` weights, a ``/imagine prompt:`` prefix, separators left
    stranded by those removals, and repeated whitespace (line breaks included). Words, case and
    non-ASCII text are kept as they are.
    """
    # Cheap substring tests skip the regular expressions that cannot match: most prompts need few.
    if not text.isascii():
        text = _SURROGATES.sub("", text)
    if "/imagine" in text or "/IMAGINE" in text:
        text = _IMAGINE_PREFIX.sub("", text)
    if "-" in text or "—" in text or "–" in text:
        text = strip_midjourney_parameters(text)
    if "://" in text or "www." in text or "mj.run" in text:
        text = _URL.sub(" ", text)
    if "::" in text:
        text = _WEIGHT.sub(" ", text)
    text = " ".join(text.split())
    # Separators stranded by the removals: "a cat , , watercolor ," -> "a cat, watercolor".
    if " ," in text or " ;" in text:
        text = text.replace(" ,", ",").replace(" ;", ";")
    if ",," in text or ",;" in text or ";," in text or ";;" in text:
        text = _REPEATED_SEPARATORS.sub(r"\1", text)
    return text.strip(_EDGE_SEPARATORS)

