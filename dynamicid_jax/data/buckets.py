"""Aspect-ratio buckets: which size each photo is cropped to, and which bucket each batch holds.

A bucket is a pixel size (height, width); a bucket set is an ordered tuple of them, written
`WIDTHxHEIGHT,...` on command lines and in configs (as image sizes are usually written) and
[height, width] in arrays and JSON (as numpy shapes and SDXL's time ids are). One square
bucket (R, R) is the default: today's square centre crop at resolution R.

    sizes = parse("1024x1024,1152x896,896x1152")    # ((1024, 1024), (896, 1152), (1152, 896))
    k = nearest(h, w, sizes)                         # the bucket of an h x w photo
    nh, nw, top, left = crop_geometry(h, w, sizes[k])  # resize to (nh, nw), crop at (top, left)
    schedule = Schedule(counts, seed)                # batch j -> (bucket, batches of it before j)

Precompute (`data/precompute.py`) resizes each photo so it covers its bucket and centre-crops
it there (SDXL's original_size / crop_top_left are that resize's and crop's); training
(`data/pipeline.py`) draws each global batch from one bucket (`Schedule`), so every batch
has one shape and the step compiles once per bucket.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from dynamicid_jax.errors import ConfigError

Size = tuple[int, int]  # (height, width) in pixels


def format_size(size: Size) -> str:
    """(height, width) -> "WIDTHxHEIGHT"."""
    return f"{size[1]}x{size[0]}"


def format_sizes(sizes: Sequence[Size]) -> str:
    return ",".join(format_size(s) for s in sizes)


def parse(text: str, flag: str = "--buckets") -> tuple[Size, ...]:
    """"W1xH1,W2xH2,..." -> ((H1, W1), (H2, W2), ...) in the given order; ConfigError naming
    `flag` for a malformed, non-positive or repeated size."""
    sizes = []
    for part in str(text).split(","):
        pieces = part.strip().lower().split("x")
        try:
            width, height = (int(p) for p in pieces)
        except ValueError:
            raise ConfigError(f"{flag} {text}: {part.strip()!r} is not WIDTHxHEIGHT (e.g. 1152x896)") from None
        if width < 1 or height < 1:
            raise ConfigError(f"{flag} {text}: {part.strip()!r} has a side < 1")
        if (height, width) in sizes:
            raise ConfigError(f"{flag} {text}: {part.strip()} is listed twice")
        sizes.append((height, width))
    return tuple(sizes)


def check_multiple(sizes: Sequence[Size], multiple: int, what: str) -> None:
    """Every side a multiple of `multiple` (the VAE factor, or the factor a UNet needs)."""
    bad = [format_size(s) for s in sizes if s[0] % multiple or s[1] % multiple]
    if bad:
        raise ConfigError(f"{what}: {', '.join(bad)} not multiples of {multiple} on both sides")


def size_multiple(model) -> int:
    """What a model config's sides must be multiples of: the VAE factor times the UNet's
    downsampling (2 ** (levels - 1)), so every level's latent halves evenly."""
    return 2 ** (len(model.vae.block_out_channels) - 1) * 2 ** (len(model.unet.block_out_channels) - 1)


def scaled_preset(sizes: Sequence[Size], native: int, resolution: int, multiple: int) -> tuple[Size, ...]:
    """A family's bucket set (made for its native side `native`) for another `resolution`:
    each side scaled by resolution / native and rounded to the nearest multiple of `multiple`
    (at least `multiple`); sizes that coincide after rounding are kept once, in order. At the
    native resolution (and sides already multiples) the set is returned unchanged."""
    out: list[Size] = []
    for h, w in sizes:
        size = tuple(max(multiple, int(round(side * resolution / native / multiple)) * multiple) for side in (h, w))
        if size not in out:
            out.append(size)
    return tuple(out)


def nearest(height: int, width: int, sizes: Sequence[Size]) -> int:
    """Index of the bucket whose aspect ratio is nearest the photo's (in log ratio, so 2:1 and
    1:2 are equally far from 1:1); ties go to the earlier bucket (distances rounded to 1e-9:
    log(4/3) and -log(3/4) differ in their last bit)."""
    ratio = math.log(width / height)
    distances = [round(abs(ratio - math.log(w / h)), 9) for h, w in sizes]
    return int(np.argmin(distances))  # argmin: the first of equal minima


def crop_geometry(height: int, width: int, size: Size) -> tuple[int, int, int, int]:
    """How an height x width photo becomes a `size` crop -> (resized h, resized w, top, left).

    Resized (aspect kept) by the smallest scale that covers the bucket on both sides, then
    centre-cropped. For a square bucket (R, R) this is the usual shorter-side-to-R resize and
    centre crop. (top, left) is the crop's offset in the resized image: SDXL's crop_top_left.
    """
    bh, bw = size
    scale = max(bh / height, bw / width)
    nh, nw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return nh, nw, (nh - bh) // 2, (nw - bw) // 2


# --------------------------------------------------------------------------- training side


def manifest_sizes(manifest) -> tuple[Size, ...]:
    """The bucket set shards were made with: the manifest's "buckets" sizes, or the one square
    bucket of its resolution (shards made without buckets)."""
    recorded = manifest.get("buckets")
    if recorded:
        return tuple((int(h), int(w)) for h, w in recorded["sizes"])
    resolution = int(manifest["settings"]["resolution"])
    return ((resolution, resolution),)


def config_sizes(data_config) -> tuple[Size, ...]:
    """The bucket set a training config names: `data.buckets` ("WxH,...") or, when empty, the
    one square bucket of `data.resolution`."""
    text = data_config.get("buckets", "") or ""
    if text:
        return parse(text, "--config.data.buckets")
    return ((int(data_config.resolution),) * 2,)


class Schedule:
    """Batch j -> (bucket k, how many batches of bucket k come before j): the same on every
    host (a function of the seed and the dataset's global per-bucket counts only), so a global
    batch holds one bucket on every host, and a pure function of j, so an iterator resumes
    exactly from its batch index.

    Bucket k is drawn for batch j with probability counts[k] / sum(counts) (an epoch visits
    every record about once), in blocks of `block` batches from numpy's generator seeded by
    (seed, block number); per-bucket totals of the blocks before are cached, so a resumed
    run at batch j costs j / block draws of a block once. One bucket: always bucket 0, and
    batch j is that bucket's j-th (exactly the unbucketed stream).
    """

    def __init__(self, counts: Sequence[int], seed: int, block: int = 1024):
        self.counts = np.asarray(counts, np.int64)
        if self.counts.ndim != 1 or len(self.counts) == 0 or (self.counts < 0).any() or self.counts.sum() == 0:
            raise ValueError(f"bucket counts {list(counts)}: need at least one record")
        self.seed, self.block = seed, block
        self._p = self.counts / self.counts.sum()
        self._before: list[np.ndarray] = [np.zeros(len(self.counts), np.int64)]  # per-bucket totals before block b
        self._last: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))  # the last block drawn (reader threads)

    def _draw(self, b: int) -> np.ndarray:
        last = self._last
        if last[0] == b:
            return last[1]
        rng = np.random.default_rng([self.seed, b, 0x6275636B])  # "buck": not the permutations' (seed, epoch)
        drawn = rng.choice(len(self.counts), size=self.block, p=self._p)
        self._last = (b, drawn)
        return drawn

    def __call__(self, j: int) -> tuple[int, int]:
        if len(self.counts) == 1:
            return 0, int(j)
        b, at = divmod(int(j), self.block)
        while len(self._before) <= b:  # concurrent callers may extend it twice: same values, harmless
            n = len(self._before) - 1
            self._before.append(self._before[n] + np.bincount(self._draw(n), minlength=len(self.counts)))
        drawn = self._draw(b)
        k = int(drawn[at])
        return k, int(self._before[b][k] + np.count_nonzero(drawn[:at] == k))


def host_members(bucket_of: Sequence[int], num_buckets: int) -> list[list[int]]:
    """Record indices of each bucket (ascending), from the records' bucket numbers."""
    members: list[list[int]] = [[] for _ in range(num_buckets)]
    for i, k in enumerate(bucket_of):
        members[int(k)].append(i)
    return members


def missing_on_host(members: Sequence[Sequence[int]], counts: Sequence[int], host: int,
                    sizes: Optional[Sequence[Size]] = None) -> None:
    """A bucket the dataset has but this host's shards lack would leave the host without
    records for a batch every host must form: ConfigError naming it."""
    for k, (mine, total) in enumerate(zip(members, counts)):
        if total and not mine:
            name = format_size(sizes[k]) if sizes else f"#{k}"
            raise ConfigError(f"host {host} has no records of bucket {name} ({total} in the dataset): "
                              "precompute with fewer, larger shards per bucket or train on fewer hosts")
