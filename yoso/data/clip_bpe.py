"""SD1.5's CLIP BPE tokenizer rebuilt offline from the merge list that ``open_clip_torch`` ships.

SD1.5's tokenizer is CLIP's byte-level BPE: 256 byte symbols, their end-of-word forms, 48,894 merges and
the two special tokens (49,408 ids). ``open_clip_torch`` carries the merge list
(``bpe_simple_vocab_16e6.txt.gz``), so the tokenizer can be rebuilt without the model hub, with token
ids equal to SD1.5's. The package is found with ``importlib.util.find_spec``, never imported: importing
``open_clip`` pulls in torchvision, which this project does not install.

Used by the JourneyDB token counter (the default tokenizer of ``prepare_journeydb.py``) and by the tiny
test models (``yoso.testing``).
"""

import gzip
import importlib.util
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The merge file holds more merges than CLIP uses: 49152 ids minus the 256 byte and 256 end-of-word
# symbols, and minus the 2 special tokens (line 0 of the file is a header).
CLIP_MERGE_COUNT = 49152 - 256 - 2


def bpe_vocab_path():
    """Path of ``open_clip_torch``'s CLIP merge file; a RuntimeError that says how to install it if absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "open_clip_torch is needed for the offline CLIP tokenizer: pip install --no-deps open_clip_torch"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_VOCAB_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from open_clip_torch; reinstall it with pip install --no-deps open_clip_torch")
    return path


def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable characters.

    Printable bytes map to themselves, the others to characters from U+0100 on, so BPE never sees
    whitespace or control characters. The dict's order is the vocabulary's order (printable bytes
    first): ``list(bytes_to_unicode().values())`` are token ids 0..255.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code)
            next_code += 1
    return table


def clip_bpe_vocab():
    """SD1.5's CLIP vocabulary (token -> id) and merge list (pairs), read from ``open_clip_torch``'s file."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [char + "</w>" for char in byte_chars] + ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{bpe_vocab_path()} gives {len(tokens)} tokens, not CLIP's {CLIP_VOCAB_SIZE}: reinstall open_clip_torch")
    return {token: index for index, token in enumerate(tokens)}, merges


def make_clip_tokenizer(pad_token="<|endoftext|>"):
    """SD1.5's CLIP tokenizer (77 tokens); ``pad_token="!"`` gives the SD2 / SD-Turbo variant."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH)
