"""Build the precompute inputs of the tiny run from the real test photos (`make assets`).

    python data_pipelines/photo_folders.py --photos test_assets --out tiny_run/inputs

Writes two folders in the layouts `data_pipelines/precompute.py` reads
(dynamicid_jax/data/inputs.py):

  anchor/       every photo below with a `.txt` caption sidecar (written by hand from what
                each photo shows); the mountain picture holds no face, so the anchor job
                rejects it and says so in rejects.jsonl.
  identities/   one folder per person with several photos: `obama/` (three photos) and
                `woman/` (four video frames) get automatic face prompts (expression
                classifier + head pose at precompute time); `woman_kdef/` holds two more
                frames of the same woman under KDEF-style names (expression and view read
                off the frames by eye), the stage-2 config's second data source.

Rerunning it leaves identical files alone (the later steps resume on unchanged inputs).
"""

from __future__ import annotations

import pathlib
import sys

from dynamicid_jax import cli
from dynamicid_jax.atomic_write import atomic_write_bytes
from dynamicid_jax.errors import MissingFileError

# photo -> caption (what the photo shows; the tiny model cannot use more detail)
CAPTIONS = {
    "obama.jpg": "a smiling man in a dark suit and blue tie, arms crossed, in an office with flags",
    "obama2.jpg": "a man in a dark suit and red tie speaking at a podium with a microphone",
    "obama3.jpg": "a man in a dark suit standing with arms crossed in a room with a chandelier",
    "biden.jpg": "an older man with white hair in a dark suit and striped tie, arms crossed",
    "0-f1-su-ph.jpg": "a young woman with short dark hair, surprised, mouth open, against a blue wall",
    "0-f15-hao-ph.jpg": "a young woman with dark hair smiling broadly against a blue wall",
    "15-f13-anc-ph.jpg": "a young woman with short dark hair frowning angrily against a blue wall",
    "45-m7-di-ph.jpg": "a young man with dark hair turned to the side with a disgusted look",
    "single_face.jpg": "a smiling young man in a black polo shirt outdoors in the mountains",
    "multi_face.jpg": "a group of five young friends smiling outdoors at sunset",
    "woman_frame_000.png": "a young woman with long brown hair looking down sadly, dark background",
    "woman_frame_090.png": "a young woman with long brown hair crying, hand at her face, dark background",
    "woman_frame_180.png": "a young woman with long brown hair, shocked, hand over her mouth",
    "woman_frame_270.png": "a young woman with long brown hair smiling, dark background",
    "woman_frame_360.png": "a young woman with long brown hair laughing, dark background",
    "woman_frame_460.png": "a young woman with long brown hair laughing with her head tilted",
    "free-mountain-vector-01.jpg": "a vector illustration of blue mountains and a lake at sunrise",
}
# identity -> [(file name in the identity folder, photo)]
IDENTITIES = {
    "obama": [("obama.jpg", "obama.jpg"), ("obama2.jpg", "obama2.jpg"), ("obama3.jpg", "obama3.jpg")],
    "woman": [(f"frame_{k}.png", f"woman_frame_{k}.png") for k in ("000", "180", "270", "460")],
    # KDEF names: session A, female 01, SA = sad / HA = happy, S = straight (front view)
    "woman_kdef": [("AF01SAS.png", "woman_frame_090.png"), ("AF01HAS.png", "woman_frame_360.png")],
}


def _put(src: pathlib.Path, dest: pathlib.Path, text: str | None = None) -> bool:
    """Copy `src` (or write `text`) to `dest` unless it already holds the same bytes -> written?"""
    data = src.read_bytes() if text is None else (text + "\n").encode()
    if dest.is_file() and dest.read_bytes() == data:
        return False
    atomic_write_bytes(dest, data)
    return True


def build(photos: pathlib.Path, out: pathlib.Path) -> dict[str, int]:
    """Write out/anchor and out/identities from `photos`; -> {"written": n, "unchanged": m}."""
    missing = sorted({p for p in CAPTIONS} - {p.name for p in photos.glob("*")}) if photos.is_dir() else ["(folder)"]
    if missing:
        raise MissingFileError(f"--photos {photos}: missing {', '.join(missing)} (run `make assets` to fetch them)")
    written = unchanged = 0
    for name, caption in CAPTIONS.items():
        for dest, text in ((out / "anchor" / name, None), ((out / "anchor" / name).with_suffix(".txt"), caption)):
            if _put(photos / name, dest, text):
                written += 1
            else:
                unchanged += 1
    for identity, files in IDENTITIES.items():
        for dest, name in files:
            if _put(photos / name, out / "identities" / identity / dest):
                written += 1
            else:
                unchanged += 1
    return {"written": written, "unchanged": unchanged}


def main(argv=None) -> int:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=pathlib.Path, required=True, help="the test photos folder (make assets)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="gets anchor/ and identities/")
    args = p.parse_args(argv)
    return cli.run_main(_run, args)


def _run(args) -> int:
    cli.check_output_folder(args.out, "--out", inputs={"--photos": args.photos})
    counts = build(args.photos, args.out)
    n_id = sum(len(v) for v in IDENTITIES.values())
    print(f"wrote {args.out / 'anchor'} ({len(CAPTIONS)} captioned photos) and {args.out / 'identities'} "
          f"({len(IDENTITIES)} identity folders, {n_id} photos): {counts['written']} files written, "
          f"{counts['unchanged']} already there", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
