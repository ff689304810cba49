"""Shared by test_precompute.py and test_input_pipeline.py: input folders and stand-in extractors;
by test_tiny_run.py and test_dynamicid_sdxl_run.py: the tiny evaluation test set (`tiny_testset`);
by test_evaluation.py and test_evaluation_protocol.py: test-set files of given photos (`write_protocol`).

The stand-ins are cheap numpy functions of the pixels (no models), for the tests of the
shard/manifest/pipeline mechanics; the real extractors (tiny random models + offline face
analysis) are tested in test_precompute.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import types

import numpy as np

from dynamicid_jax.data.precompute import ExtractorDims, Extractors

# Real photos (tests/fetch_test_assets.py) with one clearly visible face each.
FACE_PHOTOS = ("obama.jpg", "biden.jpg", "0-f1-su-ph.jpg", "woman_frame_000.png")
FACELESS = "free-mountain-vector-01.jpg"
CORRUPT = "broken.jpg"
UNCAPTIONED = "obama2.jpg"


def make_anchor_folder(test_assets: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """Face photos with captions (half .txt sidecars, half captions.jsonl), plus a face-less
    photo (captioned), a corrupt file (captioned) and a photo without a caption."""
    folder.mkdir(parents=True)
    jsonl = []
    for i, name in enumerate(FACE_PHOTOS):
        shutil.copy(test_assets / name, folder / name)
        caption = f"a photo of the person {i}"
        if i % 2:
            jsonl.append({"file": name, "caption": caption})
        else:
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
    shutil.copy(test_assets / FACELESS, folder / FACELESS)
    (folder / FACELESS).with_suffix(".txt").write_text("a mountain")
    (folder / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (folder / CORRUPT).with_suffix(".txt").write_text("broken")
    shutil.copy(test_assets / UNCAPTIONED, folder / UNCAPTIONED)
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    return folder


# identity -> [(destination name, test asset)]; the KDEF-named identity gets "kdef" prompts.
IDENTITIES = {
    "barack": [("a.jpg", "obama.jpg"), ("b.jpg", "obama2.jpg"), ("c.jpg", "obama3.jpg")],
    "kdef_f01": [("AF01SUS.JPG", "0-f1-su-ph.jpg"), ("AF01HAHL.JPG", "0-f15-hao-ph.jpg")],
    "woman": [("f000.png", "woman_frame_000.png"), ("f180.png", "woman_frame_180.png"),
              ("f360.png", "woman_frame_360.png")],
}
SIDECAR_PROMPT = ("woman/f180.png", "the expression is happy, the face is front view")


def make_identity_folder(test_assets: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    for identity, files in IDENTITIES.items():
        (folder / identity).mkdir(parents=True)
        for dest, src in files:
            shutil.copy(test_assets / src, folder / identity / dest)
    key, prompt = SIDECAR_PROMPT
    (folder / key).with_suffix(".txt").write_text(prompt)
    return folder


class StandInNoFace(ValueError):
    pass


def stand_in_extractors() -> Extractors:
    """Deterministic numpy stand-ins with small dims; 'no face' for the mountain photo."""
    dims = ExtractorDims(id_dim=16, clip_tokens=5, clip_width=6, text_length=7, text_width=3, prompt_dim=4,
                         latent_channels=4, vae_downsample=8, clip_image_size=8)

    def largest_face(image, name):
        if "mountain" in name:
            raise StandInNoFace(f"no face in {name}")
        h, w = image.shape[:2]
        emb = image[:: max(1, h // 4), :: max(1, w // 4)][:4, :4].astype(np.float32).reshape(-1)[:16] + 1.0
        return types.SimpleNamespace(embedding=emb / np.linalg.norm(emb), brightness=float(image.mean()))

    def tokenize(texts):
        return np.asarray([[len(t)] + [ord(c) % 50 for c in (t + " " * 6)[:6]] for t in texts], np.int32)

    def encode_text(ids):
        ids = np.asarray(ids, np.float32)
        return ids[..., None] * np.ones(3, np.float32), ids[:, :4] / 10

    def clip_pixels(image):
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((8, 8)), np.float32) / 255.0

    def encode_clip_pixels(px):
        return (px.reshape(len(px), -1)[:, :30].reshape(-1, 5, 6) * 3.3 + 0.1).astype(np.float32)

    def encode_vae(px):
        b, h, w = px.shape[:3]
        pooled = px.reshape(b, h // 8, 8, w // 8, 8, 3).mean((2, 4))
        mean = np.concatenate([pooled, pooled.mean(-1, keepdims=True)], -1).astype(np.float32)
        return mean, -(mean**2)

    def landmark_image(face, hw):
        out = -np.ones((96, 96, 1), np.float32)
        out[int(face.brightness) % 96, hw[0] % 96] = 1.0
        return out

    return Extractors(
        largest_face=largest_face,
        no_face_errors=(StandInNoFace,),
        landmark_image=landmark_image,
        auto_face_prompt=lambda face, image: f"in a neutral expression, in front view {int(face.brightness)}",
        tokenize=tokenize,
        encode_text=encode_text,
        clip_pixels=clip_pixels,
        encode_clip_pixels=encode_clip_pixels,
        encode_vae=encode_vae,
        dims=dims,
        models={"face_model_set": "stand-in", "base_model": "stand-in"},
    )


def read_shard_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    """Every shard, sidecar, manifest and rejects file of a dataset folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.name.endswith((".tfrecord", ".index.json")) or p.name in ("manifest.json", "rejects.jsonl")}


def tiny_testset(test_assets: pathlib.Path, folder: pathlib.Path) -> pathlib.Path:
    """configs/eval/tiny.json, whose photo paths are relative to the repository's test_assets/;
    with TEST_ASSETS elsewhere, the same file rewritten into `folder` to name those photos."""
    root = pathlib.Path(__file__).resolve().parents[1]
    testset = root / "configs" / "eval" / "tiny.json"
    if test_assets.resolve() == (root / "test_assets").resolve():
        return testset
    moved = folder / "tiny.json"
    moved.write_text(testset.read_text().replace("../../test_assets/", f"{test_assets.resolve()}/"))
    return moved


# Sampling settings of the evaluation tests' requests (the tiny model's size, 2 steps).
EVAL_SAMPLING = dict(steps=2, guidance=5.0, height=64, width=64, alpha=1, beta=4.0, id_scale=1.0, negative_prompt="")


def write_protocol(tmp_path, identities, photos_dir=None, groups=False, seeds=(0,), edits=None, name="t.json",
                    masks=None):
    """A test-set file (the evaluation protocol) `name` in `tmp_path` naming `identities`
    (name -> photo file in `photos_dir`, TEST_ASSETS by default), read back by load_protocol."""
    from dynamicid_jax.evaluation import load_protocol

    base = pathlib.Path(photos_dir or os.environ["TEST_ASSETS"])
    data = {
        "name": "test",
        "identities": {k: dict({"refs": [str(base / v)], "noun": "man"}, **({"mask": masks[k]} if k in (masks or {})
                                                                             else {}))
                       for k, v in identities.items()},
        "prompts": [{"name": "cafe", "kind": "context", "template": "a photo of {subjects} in a cafe"}],
        "edits": edits or [{"expression": "happy", "orientation": "front"}],
        "seeds": list(seeds),
    }
    if groups:
        data["groups"] = [list(identities)]
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return load_protocol(path)
