"""CLIP's byte-level BPE tokenizer, without transformers at run time.

Reads `vocab.json` + `merges.txt`, or the `tokenizer.json` that transformers 5 writes instead,
plus `tokenizer_config.json`/`special_tokens_map.json` for the special tokens, from a
pipeline's `tokenizer/` folder (SDXL: also `tokenizer_2/`, whose files name "!" as the pad
token where tokenizer 1 pads with `<|endoftext|>`). Behaviour follows transformers' CLIPTokenizer (the
`tokenizers`-backed one diffusers uses): NFC, runs of whitespace -> one space, per-character
lowercase, CLIP's pre-tokenisation regex, GPT-2 byte-to-unicode mapping, BPE with `</w>` on
the last symbol of each word, then `<|startoftext|> ... <|endoftext|>` padded to the text
encoder's context (`max_length`: the folder's `model_max_length`, else the caller's, which is
the text encoder's `max_position_embeddings`; this module assumes none).

`write_tiny_vocab(folder, max_length)` writes a small valid vocabulary for offline tests and the demo.
"""

from __future__ import annotations

import functools
import html
import json
import os
import pathlib
import unicodedata
from typing import Iterable, Mapping, Sequence

import numpy as np
import regex

from dynamicid_jax.atomic_write import atomic_write_text
from dynamicid_jax.errors import MissingFileError

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_PRETOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_WHITESPACE = regex.compile(r"\s+")
END_OF_WORD = "</w>"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:  # control/space bytes get the first unused code points above 255
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def normalize_text(text: str, fix_text: bool = False) -> str:
    """transformers' normaliser: NFC, whitespace runs -> " ", lowercase (per character, as
    the Rust normaliser does, so a final Greek sigma stays σ).

    fix_text: also apply ftfy + HTML unescaping as OpenAI's original tokenizer did (needs the
    `ftfy` package); off by default because transformers' CLIPTokenizer does not.
    """
    if fix_text:
        import ftfy  # optional dependency, asked for explicitly

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE.sub(" ", text)
    return "".join(c.lower() for c in text)


def _special_token(config: Mapping, name: str, default: str) -> str:
    """A special token from tokenizer_config.json: a string, or {"content": ...} (AddedToken)."""
    value = config.get(name, default)
    if isinstance(value, Mapping):
        value = value["content"]
    if not isinstance(value, str):
        raise ValueError(f"tokenizer config: {name} must be a string or {{'content': ...}}, got {value!r}")
    return value


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP.

    Call with a list of prompts -> int32 array (B, max_length): BOS, at most max_length - 2
    tokens, EOS, then the pad token.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        max_length: int,
        fix_text: bool = False,
    ):
        self.vocab = dict(vocab)
        self.merge_ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in self.vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        self.special_tokens = (bos_token, eos_token, pad_token, unk_token)
        self.bos_id = self.vocab[bos_token]
        self.eos_id = self.vocab[eos_token]
        self.pad_id = self.vocab[pad_token]
        self.unk_id = self.vocab[unk_token]
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.max_length = max_length
        self.fix_text = fix_text
        self._byte_map = bytes_to_unicode()
        self._split_specials = regex.compile("(" + "|".join(regex.escape(t) for t in set(self.special_tokens)) + ")")
        self._bpe_cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_folder(cls, path: str | os.PathLike, subfolder: str = "tokenizer", *,
                    fallback_max_length: int | None = None, **kwargs) -> "CLIPTokenizer":
        """From a pipeline folder (uses `subfolder`: `tokenizer`, or SDXL's `tokenizer_2`) or a
        tokenizer folder: vocab.json + merges.txt, else tokenizer.json. Special tokens (the pad
        token among them) come from the folder's own tokenizer_config.json/special_tokens_map.json.
        The length: `max_length=` when given, else the folder's `model_max_length`, else
        `fallback_max_length` (the text encoder's context); FileFormatError when none says it."""
        path = pathlib.Path(path)
        folder = path / subfolder if _has_vocabulary(path / subfolder) else path
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
            for f in (vocab_file, merges_file):
                if not f.is_file():
                    raise MissingFileError(f"tokenizer file missing: {f} (nor a tokenizer.json)")
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            merges = read_merges(merges_file)
        else:
            vocab, merges = read_tokenizer_json(folder / "tokenizer.json")
        config: dict = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            if (folder / name).is_file():
                with open(folder / name, encoding="utf-8") as f:
                    config.update(json.load(f))
        options = dict(
            bos_token=_special_token(config, "bos_token", "<|startoftext|>"),
            eos_token=_special_token(config, "eos_token", "<|endoftext|>"),
            pad_token=_special_token(config, "pad_token", "<|endoftext|>"),
            unk_token=_special_token(config, "unk_token", "<|endoftext|>"),
        )
        max_length = config.get("model_max_length")
        if isinstance(max_length, int) and max_length <= 4096:  # transformers writes 1e30 for "unset"
            options["max_length"] = max_length
        elif fallback_max_length is not None:
            options["max_length"] = fallback_max_length
        options.update(kwargs)
        if "max_length" not in options:
            from dynamicid_jax.input_files import FileFormatError

            raise FileFormatError(f"{folder}: the tokenizer states no model_max_length (tokenizer_config.json); "
                                  "its text encoder's max_position_embeddings says how many tokens a prompt takes")
        return cls(vocab, merges, **options)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """One pre-token (already byte-mapped) -> token ids."""
        cached = self._bpe_cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = [(self.merge_ranks.get(p, None), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
            ranked = [r for r in pairs if r[0] is not None]
            if not ranked:
                break
            best = min(ranked)[2]
            merged, i = [], 0
            while i < len(symbols):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = tuple(self.vocab.get(s, self.unk_id) for s in symbols)
        self._bpe_cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without BOS/EOS, not truncated."""
        ids: list[int] = []
        for chunk in self._split_specials.split(text):
            if chunk in self.special_tokens:  # typed literally: the special token itself
                ids.append(self.vocab[chunk])
                continue
            for piece in _PRETOKENIZE.findall(normalize_text(chunk, self.fix_text)):
                mapped = "".join(self._byte_map[b] for b in piece.encode("utf-8"))
                ids.extend(self._bpe(mapped))
        return ids

    def __call__(self, texts: Iterable[str]) -> np.ndarray:
        """Prompts -> (B, max_length) int32, truncated to keep BOS and EOS, padded with the pad token."""
        if isinstance(texts, str):
            raise TypeError("pass a list of prompts, not a single string")
        rows = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"prompt must be a string, got {type(text).__name__}: {text!r}")
            body = self.encode(text)[: self.max_length - 2]
            row = [self.bos_id, *body, self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return np.asarray(rows, dtype=np.int32).reshape(len(rows), self.max_length)


def _has_vocabulary(folder: pathlib.Path) -> bool:
    return (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()


def read_tokenizer_json(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges of a `tokenizers` file (what transformers 5 saves in place of
    vocab.json + merges.txt). Merges are pairs, or "left right" strings in older files."""
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
        raise ValueError(f"{path}: not a CLIP BPE tokenizer (model type {model.get('type')!r}, "
                         f"end_of_word_suffix {model.get('end_of_word_suffix')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: a merge must be two symbols, got {bad[0]!r}")
    return dict(model["vocab"]), merges


def read_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """merges.txt -> [(left, right), ...] in rank order; a leading `#version` line is skipped."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.rstrip("\n")
            if (n == 0 and line.startswith("#version")) or not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}:{n + 1}: a merge must be two symbols separated by one space, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


# Words of the tiny vocabulary: the merges spell these out, so test prompts get multi-byte tokens.
_TINY_WORDS = ("a", "photo", "of", "the", "person", "face", "is", "happy", "in", "and", "view", "front")


def write_tiny_vocab(folder: str | os.PathLike, max_length: int) -> pathlib.Path:
    """Write a small but valid CLIP vocabulary (vocab.json, merges.txt, tokenizer_config.json
    stating `max_length`, the tiny text encoder's context, as its model_max_length).

    Layout as CLIP's: the 256 byte symbols, the same with `</w>`, merge results, then
    <|startoftext|> and <|endoftext|> last (so EOS has the largest id, which the legacy
    argmax pooling rule relies on). Merges build each of `_TINY_WORDS` left to right.
    Returns the folder. About 560 entries: a tiny text encoder needs vocab_size >= len(vocab).
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    vocab_list = base + [c + END_OF_WORD for c in base]
    merges: list[tuple[str, str]] = []
    for word in _TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
                vocab_list.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    config = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "model_max_length": max_length,
    }
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))
    return folder


def tiny_tokenizer(max_length: int, **kwargs) -> CLIPTokenizer:
    """THE tokenizer of the tiny random base model: `write_tiny_vocab` in a temporary folder;
    max_length: the tiny text encoder's context (its config's max_positions).

    Every consumer of that base model (the precompute job, the stage-2 prompt of a tiny
    training run, the demo and a sampler of a tiny run) tokenizes with it, so their ids agree.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_folder(write_tiny_vocab(tmp, max_length), **kwargs)
