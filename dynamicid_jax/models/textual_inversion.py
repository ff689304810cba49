"""Textual-inversion embeddings (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`) as prompt tokens.

File layouts read (never with torch: `.pt`/`.bin` go through the restricted `torch_pickle`):
  A1111 `.pt`              {"string_to_param": {"*": (n, D)}, "string_to_token": ..., "name": ...}
  A1111 `.safetensors`     {"emb_params": (n, D)}
  diffusers learned_embeds {token: (D,)} or {token: (n, D)} (one key)
The embedding's name is the file's stem (A1111's rule: `EasyNegative.safetensors` is written
"EasyNegative" in a prompt). Every whole-word mention of the name (case-insensitive, as
CLIP lowercases prompts) becomes n tokens of its own whose input embeddings are the file's
n vectors; nothing else in the text changes.

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


class EmbeddingFileError(UserError, ValueError):
    """A textual-inversion file that cannot be used (names the file)."""


@dataclasses.dataclass(frozen=True)
class TextualInversion:
    """One embedding: `name` in a prompt stands for the n rows of `vectors` (n, D) float32."""

    name: str
    vectors: np.ndarray
    path: str
    sha256: str

    def record(self) -> dict:
        """What a sidecar keeps of it."""
        return {"file": self.path, "name": self.name, "sha256": self.sha256, "vectors": int(self.vectors.shape[0])}


def _vectors(data, path) -> np.ndarray:
    if not isinstance(data, dict):
        raise EmbeddingFileError(f"{path}: not a textual-inversion embedding (holds a {type(data).__name__})")
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingFileError(f"{path}: 'string_to_param' must hold one tensor")
        return next(iter(params.values()))
    if "emb_params" in data:
        return data["emb_params"]
    if "clip_l" in data and "clip_g" in data:
        raise EmbeddingFileError(f"{path}: an SDXL embedding (clip_l + clip_g); SD1.5 needs a single-encoder one")
    arrays = [v for v in data.values() if isinstance(v, np.ndarray)]
    if len(data) == 1 and arrays:
        return arrays[0]
    raise EmbeddingFileError(f"{path}: no embedding found (keys {sorted(map(str, data))[:8]}; expected "
                             "'string_to_param', 'emb_params' or a single {token: vector})")


def read_embedding(path: str | os.PathLike, width: Optional[int] = None) -> TextualInversion:
    """Read one embedding file; EmbeddingFileError naming it (and both widths when its vectors
    are not `width`-d, e.g. a 1024-d SD2 embedding for SD1.5's 768-d text encoder)."""
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
    vectors = np.asarray(_vectors(data, path))
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating) and \
            vectors.dtype.name != "bfloat16":
        raise EmbeddingFileError(f"{path}: expected float vectors (n, width), got {vectors.dtype} {vectors.shape}")
    if width is not None and vectors.shape[1] != width:
        raise EmbeddingFileError(f"{path}: {vectors.shape[1]}-d embedding vectors, but the text encoder is {width}-d "
                                 "(an embedding trained for another model, e.g. SD2's 1024-d)")
    vectors = vectors.astype(np.float32)
    if not np.all(np.isfinite(vectors)):
        raise EmbeddingFileError(f"{path}: the embedding has non-finite values")
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


def tokenize(tokenizer, text: str, embeddings: Sequence[TextualInversion], vocab_size: int, width: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(ids (L,) int32, table (L - 2, width) float32) of one prompt, L = tokenizer.max_length.

    Text between mentions is tokenised as usual; a mention of an n-vector embedding gives n
    tokens. After truncation to L - 2 tokens (BOS and EOS kept), the k-th embedding token is
    id vocab_size + k and its input embedding is table[k].
    """
    body: list = []  # token ids, or (embedding, row) for an embedding token
    if embeddings:
        by_name = {e.name.lower(): e for e in embeddings}
        position = 0
        for match in _mention([e.name for e in embeddings]).finditer(text):
            body += tokenizer.encode(text[position:match.start()])
            found = by_name[match.group(0).lower()]
            body += [(found, j) for j in range(found.vectors.shape[0])]
            position = match.end()
        body += tokenizer.encode(text[position:])
    else:
        body = tokenizer.encode(text)
    body = body[: tokenizer.max_length - 2]
    table = np.zeros((tokenizer.max_length - 2, width), np.float32)
    ids, k = [tokenizer.bos_id], 0
    for token in body:
        if isinstance(token, tuple):
            table[k] = token[0].vectors[token[1]]
            ids.append(vocab_size + k)
            k += 1
        else:
            ids.append(token)
    ids.append(tokenizer.eos_id)
    ids += [tokenizer.pad_id] * (tokenizer.max_length - len(ids))
    return np.asarray(ids, np.int32), table
