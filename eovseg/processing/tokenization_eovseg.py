"""An offline transformers `CLIPTokenizer` that tokenizes exactly like open_clip.

EOV-Seg encodes its vocabulary with the text tower of an open_clip CLIP model, so prompts must be tokenized the way
open_clip's `SimpleTokenizer` does it (`open_clip.get_tokenizer("RN50")`). That tokenizer's vocabulary differs from the
Hugging Face CLIP checkpoints in its special tokens (`<start_of_text>` / `<end_of_text>` instead of
`<|startoftext|>` / `<|endoftext|>`), in padding (open_clip pads with id 0) and in text cleaning (ftfy and HTML
unescaping). This module builds the vocabulary and merges from the BPE file shipped inside the open_clip package, so
nothing is downloaded.

Two ways of tokenizing are offered:

* [`clip_tokenize`] is the reference: it cleans and pre-tokenizes text in Python exactly as open_clip does and runs the
  BPE of the tokenizer's backend, returning open_clip's `(N, context_length)` id tensor for any input.
* Calling the tokenizer itself (`tokenizer(texts, padding="max_length", max_length=77, truncation=True)`) gives the same
  ids for text that is already clean (lower-case, no ftfy-repairable characters or HTML entities), padded with 0 and
  with `<end_of_text>` kept last on truncation. It differs where open_clip's ftfy / HTML cleaning changes the text
  (curly quotes, ligatures, full-width forms, `&amp;`, mojibake, ...) and for literal special-token strings inside a
  text (`<start_of_text>`, `<end_of_text>`, `<|endoftext|>`, ...). Use [`clip_tokenize`] (as [`EovSegProcessor`]
  does) for model inputs.

Note on transformers 5: `CLIPTokenizer` is the `tokenizers`-backed class (`CLIPTokenizerFast` is an alias). It must be
built from in-memory `vocab` / `merges` (or loaded with `from_pretrained`): `CLIPTokenizer(vocab_file=..., merges_file=...)`
silently ignores the files and builds a 3-token vocabulary that maps every text to ids like `0, 2, 2, ...`.
[`check_clip_tokenizer`] detects such a tokenizer.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from collections.abc import Sequence
from functools import lru_cache

import regex
import torch
from transformers import CLIPTokenizer


DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip pads with id 0, which is the byte-level token "!" of its vocabulary.
PAD_TOKEN = "!"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
VOCAB_SIZE = 49408
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# Number of merges open_clip (and OpenAI CLIP) use from the BPE file: lines 1 .. 49152 - 256 - 2 (inclusive).
NUM_MERGES = 49152 - 256 - 2

# open_clip's pre-tokenization pattern (SimpleTokenizer.pat, with its two special tokens).
_OPEN_CLIP_PATTERN = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL_TOKEN_IDS = {SOT_TOKEN: SOT_TOKEN_ID, EOT_TOKEN: EOT_TOKEN_ID}

# A few prompts with their open_clip ids, used to recognise a broken tokenizer.
_REFERENCE_IDS = {
    "a photo of a dog.": [SOT_TOKEN_ID, 320, 1125, 539, 320, 1929, 269, EOT_TOKEN_ID],
    "hello !": [SOT_TOKEN_ID, 3306, 256, EOT_TOKEN_ID],
}


class ClipTokenizerError(ValueError):
    """Raised for a tokenizer that does not reproduce open_clip's ids."""


def default_bpe_path() -> str:
    """Path of the BPE merges file shipped with the installed `open_clip` package (the package is not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The open_clip package (pip install open_clip_torch) is needed: its BPE vocabulary file "
            f"{BPE_FILENAME} is used to build the CLIP tokenizer offline."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, BPE_FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{BPE_FILENAME} was not found in the open_clip package ({list(spec.submodule_search_locations)}).")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode character table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=4)
def _read_bpe(bpe_path: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ClipTokenizerError(f"{bpe_path} does not look like CLIP's BPE file ({len(merges)} merges read).")
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    return tuple(vocab), merges


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's encoder (token -> id, 49,408 entries) and its BPE merges, built from the BPE file exactly as
    `open_clip.tokenizer.SimpleTokenizer` builds them: the 256 byte characters, the same with `</w>`, the joined
    merges, then `<start_of_text>` and `<end_of_text>`."""
    vocab, merges = _read_bpe(bpe_path or default_bpe_path())
    encoder = {token: i for i, token in enumerate(vocab)}
    if len(encoder) != VOCAB_SIZE:
        raise ClipTokenizerError(f"Expected {VOCAB_SIZE} distinct tokens, built {len(encoder)}.")
    return encoder, list(merges)


def write_vocab_files(save_directory: str | os.PathLike, bpe_path: str | None = None) -> tuple[str, str]:
    """Write `vocab.json` and `merges.txt` (Hugging Face BPE format) derived from open_clip's BPE file."""
    os.makedirs(save_directory, exist_ok=True)
    encoder, merges = clip_vocab_and_merges(bpe_path)
    vocab_file = os.path.join(save_directory, "vocab.json")
    merges_file = os.path.join(save_directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return vocab_file, merges_file


def build_clip_tokenizer(
    save_directory: str | os.PathLike | None = None,
    bpe_path: str | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> CLIPTokenizer:
    """Build open_clip's tokenizer as a transformers [`CLIPTokenizer`], without any download.

    The vocabulary and merges come from open_clip's `bpe_simple_vocab_16e6.txt.gz`. Special tokens: bos
    `<start_of_text>` (49406), eos and unk `<end_of_text>` (49407), pad `"!"` (id 0, so padding writes 0 like
    open_clip; the eos id stays the largest id of each row). Because `"!"` is also ordinary text, the tokenizer is
    created with `split_special_tokens=True`: special-token strings inside a text are tokenized as text, so a `"!"` in
    a prompt is encoded as open_clip encodes it.

    Args:
        save_directory: if given, the tokenizer is also saved there (`save_pretrained`: `tokenizer.json`,
            `tokenizer_config.json`, ...); reload it with `CLIPTokenizer.from_pretrained(save_directory)`.
        bpe_path: BPE merges file; defaults to the one inside the installed open_clip package.
        context_length: `model_max_length` of the tokenizer (77 for every CLIP text tower).
    """
    encoder, merges = clip_vocab_and_merges(bpe_path)
    tokenizer = CLIPTokenizer(
        vocab=encoder,
        merges=merges,
        bos_token=SOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=context_length,
        split_special_tokens=True,
    )
    check_clip_tokenizer(tokenizer)
    if save_directory is not None:
        tokenizer.save_pretrained(save_directory)
    return tokenizer


def check_clip_tokenizer(tokenizer) -> None:
    """Raise [`ClipTokenizerError`] unless `tokenizer` has open_clip's vocabulary and special ids and tokenizes a few
    reference prompts to open_clip's ids (catches, for example, a tokenizer built from ignored vocab files whose ids
    are all 0 and 2)."""
    problems = []
    # the base vocabulary: special tokens added on top (from_pretrained(..., cls_token=...)) never enter the prompts'
    # ids, which come from the byte-pair merges of that vocabulary (the reference prompts below check it)
    if tokenizer.vocab_size != VOCAB_SIZE:
        problems.append(f"vocabulary of {tokenizer.vocab_size} tokens instead of {VOCAB_SIZE}")
    for name, expected in (("bos", SOT_TOKEN_ID), ("eos", EOT_TOKEN_ID), ("pad", PAD_TOKEN_ID)):
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value != expected:
            problems.append(f"{name}_token_id is {value}, expected {expected}")
    if not problems:
        for text, expected in _REFERENCE_IDS.items():
            ids = clip_tokenize(tokenizer, [text], context_length=len(expected))[0].tolist()
            if ids != expected:
                problems.append(f"{text!r} -> {ids}, expected {expected}")
    if problems:
        raise ClipTokenizerError(
            "This tokenizer does not reproduce open_clip's CLIP tokenization: " + "; ".join(problems) + ". Build it "
            "with eovseg.processing.tokenization_eovseg.build_clip_tokenizer() (note that in transformers 5 "
            "CLIPTokenizer(vocab_file=..., merges_file=...) ignores the files)."
        )


def clean_text(text: str) -> str:
    """open_clip's default text cleaning (`clean="lower"`): ftfy, HTML unescaping (twice), whitespace collapsed,
    lower case."""
    import ftfy

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = " ".join(text.strip().split()).strip()
    return text.lower()


def _bpe_ids(model, pretoken: str, byte_encoder: dict[int, str], cache: dict[str, list[int]]) -> list[int]:
    ids = cache.get(pretoken)
    if ids is None:
        special = _SPECIAL_TOKEN_IDS.get(pretoken)
        if special is not None:
            ids = [special]
        else:
            word = "".join(byte_encoder[b] for b in pretoken.encode("utf-8"))
            ids = [token.id for token in model.tokenize(word)]
        cache[pretoken] = ids
    return ids


def clip_token_ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Content ids (without `<start_of_text>` / `<end_of_text>`, not truncated) of each text, as open_clip's
    `SimpleTokenizer.encode`: open_clip's cleaning and pre-tokenization in Python, then the BPE of `tokenizer`'s
    backend model."""
    model = tokenizer.backend_tokenizer.model
    if getattr(model, "end_of_word_suffix", None) != "</w>":
        raise ClipTokenizerError("The tokenizer's backend is not CLIP's byte-level BPE (end_of_word_suffix '</w>').")
    byte_encoder = bytes_to_unicode()
    cache: dict[str, list[int]] = {}
    result = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"Texts to tokenize must be strings, got {type(text).__name__} ({text!r}).")
        ids: list[int] = []
        for pretoken in _OPEN_CLIP_PATTERN.findall(clean_text(text)):
            ids.extend(_bpe_ids(model, pretoken, byte_encoder, cache))
        result.append(ids)
    return result


def clip_tokenize(
    tokenizer, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
) -> torch.LongTensor:
    """Tokenize like `open_clip.get_tokenizer(...)(texts)`: a `(N, context_length)` LongTensor of
    `<start_of_text> ids <end_of_text>` padded with 0; a text too long is cut to `context_length` tokens with
    `<end_of_text>` written in the last position."""
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (start and end tokens), got {context_length}.")
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, ids in enumerate(clip_token_ids(tokenizer, texts)):
        tokens = [sot] + ids[: context_length - 2] + [eot]
        result[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return result


__all__ = [
    "ClipTokenizerError",
    "DEFAULT_CONTEXT_LENGTH",
    "EOT_TOKEN",
    "PAD_TOKEN",
    "SOT_TOKEN",
    "build_clip_tokenizer",
    "check_clip_tokenizer",
    "clean_text",
    "clip_token_ids",
    "clip_tokenize",
    "clip_vocab_and_merges",
    "default_bpe_path",
    "write_vocab_files",
]
