"""Textual-inversion embeddings (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`, SDXL
pairs) as prompt tokens.

File layouts read (never with torch: `.pt`/`.bin` go through the restricted `torch_pickle`):
  A1111 `.pt`              {"string_to_param": {"*": (n, D)}, "string_to_token": ..., "name": ...}
  A1111 `.safetensors`     {"emb_params": (n, D)}
  diffusers learned_embeds {token: (D,)} or {token: (n, D)} (one key)
  SDXL (A1111, ComfyUI)    {"clip_l": (n, 768), "clip_g": (n, 1280)}: the same n tokens in both
                           tokenizers, clip_l's vectors into text_encoder, clip_g's into text_encoder_2
A file is either a single-encoder embedding or an SDXL pair; the base model's family says
which it needs (the widths of its text encoders, `read_embedding(path, widths)`).
The embedding's name is the file's stem (A1111's rule: `EasyNegative.safetensors` is written
"EasyNegative" in a prompt). Every whole-word mention of the name (case-insensitive, as
CLIP lowercases prompts) becomes n tokens of its own whose input embeddings are the file's
n vectors (per text encoder); nothing else in the text changes.

No program depends on which embeddings a text uses: `tokenize` returns, beside the ids, a
per-text table of max_length - 2 rows (the most tokens a prompt keeps) and gives the k-th
embedding token of the (truncated) text the id vocab_size + k, whose input embedding the text
encoder takes from row k of that table (`clip.CLIPTextEmbeddings`). Texts without embeddings
pass a zero table and equal ids: the same compiled text encoder serves every case.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from typing import Optional, Sequence

import numpy as np

from dynamicid_jax.errors import MissingFileError, UserError

from . import torch_pickle

SUFFIXES = (".pt", ".bin", ".safetensors")
PAIR_KEYS = ("clip_l", "clip_g")  # an SDXL file's vectors, in its text encoders' order
PAIR_ENCODERS = ("text_encoder", "text_encoder_2")  # where each goes (names in the error lines)


class EmbeddingFileError(UserError, ValueError):
    """A textual-inversion file that cannot be used (names the file)."""


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """One embedding: `name` in a prompt stands for n tokens; `vectors` holds one (n, D_i)
    float32 array per text encoder the file is for (one; SDXL's pair: clip_l's, clip_g's)."""

    name: str
    vectors: tuple[np.ndarray, ...]
    path: str
    sha256: str

    @property
    def count(self) -> int:
        """n, the tokens a mention becomes."""
        return int(self.vectors[0].shape[0])

    def record(self) -> dict:
        """What a sidecar keeps of it."""
        return {"file": self.path, "name": self.name, "sha256": self.sha256, "vectors": self.count}


def _vectors(data, path) -> tuple:
    """The file's arrays, one per text encoder (a single one, or SDXL's clip_l, clip_g)."""
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"{path}: not a textual-inversion embedding (holds a {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFileError(f"{path}: 'string_to_param' must hold one tensor")
        return (next(iter(params.values())),)
    if "emb_params" in data:
        return (data["emb_params"],)
    if all(key in data for key in PAIR_KEYS):
        return tuple(data[key] for key in PAIR_KEYS)
    arrays = [v for v in data.values() if isinstance(v, np.ndarray)]
    if len(data) == 1 and arrays:
        return (arrays[0],)
    raise EmbeddingFileError(f"{path}: no embedding found (keys {sorted(map(str, data))[:8]}; expected "
                             "'string_to_param', 'emb_params', 'clip_l' + 'clip_g' or a single {token: vector})")


def _checked(vectors, path, label: str) -> np.ndarray:
    """One array as float32 (n, D); EmbeddingFileError naming the file otherwise."""
    vectors = np.asarray(vectors)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating) and \
            vectors.dtype.name != "bfloat16":
        raise EmbeddingFileError(f"{path}: expected float {label} (n, width), got {vectors.dtype} {vectors.shape}")
    vectors = vectors.astype(np.float32)
    if not np.all(np.isfinite(vectors)):
        raise EmbeddingFileError(f"{path}: the embedding has non-finite values")
    return vectors


def _check_widths(vectors: tuple, widths: Sequence[int], path) -> None:
    """The file's form and widths against the text encoders' `widths` (the family's
    `embedding_widths`): one clear line naming the file."""
    if len(vectors) != len(widths):
        if len(vectors) == 2:
            raise EmbeddingFileError(f"{path}: an SDXL embedding (clip_l + clip_g), but the base model has one text "
                                     "encoder: it needs a single-encoder embedding (e.g. SD1.5's)")
        raise EmbeddingFileError(f"{path}: a single-encoder embedding ({vectors[0].shape[1]}-d vectors), but the base "
                                 f"model has {len(widths)} text encoders: it needs an SDXL embedding (clip_l + clip_g)")
    if len(vectors) == 1:
        if vectors[0].shape[1] != widths[0]:
            raise EmbeddingFileError(f"{path}: {vectors[0].shape[1]}-d embedding vectors, but the text encoder is "
                                     f"{widths[0]}-d (an embedding trained for another model, e.g. SD2's 1024-d)")
        return
    for key, encoder, array, width in zip(PAIR_KEYS, PAIR_ENCODERS, vectors, widths):
        if array.shape[1] != width:
            raise EmbeddingFileError(f"{path}: {key} vectors are {array.shape[1]}-d, but {encoder} is {width}-d "
                                     "(clip_l and clip_g swapped, or an embedding for another model)")


def read_embedding(path: str | os.PathLike, widths: Optional[Sequence[int]] = None) -> TextualInversion:
    """Read one embedding file; EmbeddingFileError naming it. widths: the base model's text
    encoders' (`family.embedding_widths`; None: any form): a single-encoder file where two
    are wanted (or a pair where one is) is refused, and so are vectors of another width
    (e.g. a 1024-d SD2 embedding for SD1.5's 768-d encoder; clip_l and clip_g swapped)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"--negative_embedding: file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise EmbeddingFileError(f"{path}: an embedding file is one of {', '.join(SUFFIXES)}")
    if path.suffix == ".safetensors":
        from .torch_import import read_safetensors  # header checked against the file; bfloat16 too

        data = read_safetensors(path)
    else:
        data = torch_pickle.load(path)
    found = _vectors(data, path)
    labels = [f"{key} vectors" for key in PAIR_KEYS] if len(found) == 2 else ["vectors"]
    vectors = tuple(_checked(v, path, label) for v, label in zip(found, labels))
    if len({v.shape[0] for v in vectors}) != 1:
        raise EmbeddingFileError(f"{path}: clip_l has {vectors[0].shape[0]} vectors but clip_g {vectors[1].shape[0]} "
                                 "(one pair per token)")
    if widths is not None:
        _check_widths(vectors, widths, path)
    with open(path, "rb") as f:  # in chunks: never the whole file in memory at once
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return TextualInversion(path.stem, vectors, str(path), sha256)


def _mention(names: Sequence[str]) -> re.Pattern:
    """Whole-word, case-insensitive mentions of any of `names`, longest first."""
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def mentions(text: str, name: str) -> bool:
    return _mention([name]).search(text) is not None


def check_names(embeddings: Sequence[TextualInversion]) -> None:
    """Distinct names (case-insensitive, as they are matched): EmbeddingFileError otherwise."""
    seen: dict[str, str] = {}
    for e in embeddings:
        if e.name.lower() in seen:
            raise EmbeddingFileError(f"{e.path} and {seen[e.name.lower()]} have the same name {e.name!r} in a prompt")
        seen[e.name.lower()] = e.path


def with_names(negative_prompt: str, names: Sequence[str]) -> str:
    """The negative prompt with every name it does not mention appended (", name"); unchanged
    (so applying it twice is applying it once) when all are mentioned."""
    missing = [n for n in names if not mentions(negative_prompt, n)]
    return ", ".join(([negative_prompt] if negative_prompt.strip() else []) + missing)


def tokenize(tokenizer, text: str, embeddings: Sequence[TextualInversion], vocab_size: int, width: int,
             encoder: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids (L,) int32, table (L - 2, width) float32) of one prompt, L = tokenizer.max_length,
    for text encoder number `encoder` (the embeddings' vectors[encoder]: SDXL's 1 is clip_g).

    Text between mentions is tokenised as usual; a mention of an n-vector embedding gives n
    tokens. After truncation to L - 2 tokens (BOS and EOS kept), the k-th embedding token is
    id vocab_size + k and its input embedding is table[k]. Each tokenizer of a family with two
    calls it with its own encoder number: the same layout per encoder.
    """
    body: list = []  # token ids, or (embedding, row) for an embedding token
    if embeddings:
        by_name = {e.name.lower(): e for e in embeddings}
        position = 0
        for match in _mention([e.name for e in embeddings]).finditer(text):
            body += tokenizer.encode(text[position:match.start()])
            found = by_name[match.group(0).lower()]
            body += [(found, j) for j in range(found.count)]
            position = match.end()
        body += tokenizer.encode(text[position:])
    else:
        body = tokenizer.encode(text)
    body = body[: tokenizer.max_length - 2]
    table = np.zeros((tokenizer.max_length - 2, width), np.float32)
    ids, k = [tokenizer.bos_id], 0
    for token in body:
        if isinstance(token, tuple):
            table[k] = token[0].vectors[encoder][token[1]]
            ids.append(vocab_size + k)
            k += 1
        else:
            ids.append(token)
    ids.append(tokenizer.eos_id)
    ids += [tokenizer.pad_id] * (tokenizer.max_length - len(ids))
    return np.asarray(ids, np.int32), table
