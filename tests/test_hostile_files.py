"""Corrupt and hostile files given to every reader of user-named files: one UserError line
naming the file, raised before anything the size the file claims is allocated (measured with
tracemalloc: the peak stays under 1 MiB while headers claim gigabytes to exabytes), and no
code the file names is run. No model is built: the module runs in about 2 s.
"""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zipfile

import numpy as np
import pytest

from dynamicid_jax.errors import UserError

ALLOCATION_BOUND = 2**20  # bytes; every case below claims at least 2**30


def _refused(read, path, needle: str) -> str:
    """read(path) raises a one-line UserError naming `path` and containing `needle`, with a
    peak allocation under ALLOCATION_BOUND."""
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as info:
            read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(path) in message and needle in message and "\n" not in message, message
    assert peak < ALLOCATION_BOUND, (peak, message)
    return message


# --------------------------------------------------------------------------- safetensors


def _safetensors(path, header, data=b"", length=None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
SAFETENSORS_CASES = {
    # name: (write(path), text the one line must contain)
    "text file": (lambda p: p.write_text("a text file only named .safetensors\n"), "8-byte header length"),
    "empty": (lambda p: p.write_bytes(b""), "8-byte header length -1"),
    "header length 2**63": (lambda p: _safetensors(p, GOOD, bytes(16), length=2**63),
                            "header length 9223372036854775808"),
    "header not JSON": (lambda p: _safetensors(p, b"{not json", bytes(16)), "header is not JSON"),
    "header a list": (lambda p: _safetensors(p, [1, 2], bytes(16)), "header is not a JSON object"),
    "unknown dtype": (lambda p: _safetensors(p, {"w": {**GOOD["w"], "dtype": "F128"}}, bytes(16)),
                      "tensor 'w': unsupported dtype 'F128'"),
    "shape of 4 TiB": (lambda p: _safetensors(p, {"w": {**GOOD["w"], "shape": [2**20, 2**20]}}, bytes(16)),
                       "needs 4398046511104 bytes, its offsets span 16"),
    "negative size": (lambda p: _safetensors(p, {"w": {**GOOD["w"], "shape": [-1, 4]}}, bytes(16)),
                      "shape [-1, 4] is not a list of sizes"),
    "offsets past the data": (lambda p: _safetensors(p, {"w": {**GOOD["w"], "data_offsets": [0, 2**40]}}, bytes(16)),
                              "are not inside the 16 data bytes"),
    "entry without offsets": (lambda p: _safetensors(p, {"w": {"dtype": "F32", "shape": [1]}}, bytes(4)),
                              "needs dtype, shape and data_offsets"),
    "metadata not text": (lambda p: _safetensors(p, {"__metadata__": {"a": 1}, **GOOD}, bytes(16)), "__metadata__"),
}


def _readers():
    from dynamicid_jax.models import lora_files, textual_inversion, torch_import
    from dynamicid_jax.models.single_file import extract_component

    return {
        "read_state_dict": torch_import.read_state_dict,  # convert.py, weight folders, --dynamicid .safetensors
        "single_file": lambda p: extract_component(p, "unet"),  # --base_model FILE
        "lora": lora_files.read_adapter_configs,  # --lora reads the metadata first
        "embedding": textual_inversion.read_embedding,  # --negative_embedding
    }


@pytest.mark.parametrize("case", SAFETENSORS_CASES)
def test_safetensors_readers_refuse_a_corrupt_header_before_allocating(tmp_path, case):
    write, needle = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    write(path)
    for name, read in _readers().items():
        _refused(read, path, needle)


def test_a_good_safetensors_file_still_reads(tmp_path):
    path = tmp_path / "good.safetensors"
    values = np.arange(4, dtype=np.float32)
    _safetensors(path, GOOD, values.tobytes())
    from dynamicid_jax.models.torch_import import read_state_dict

    np.testing.assert_array_equal(read_state_dict(path)["w"], values.reshape(2, 2))


# --------------------------------------------------------------------------- torch pickles


@pytest.fixture
def torch_file(tmp_path):
    """A torch.save file of one 1024-element float32 tensor, and its storage's member name."""
    torch = pytest.importorskip("torch")
    path = tmp_path / "weights.bin"
    torch.save({"w": torch.ones(1024)}, path)
    with zipfile.ZipFile(path) as archive:
        return path, next(n for n in archive.namelist() if "/data/" in n)


def _rewrite(path, replace):
    """The archive at `path` with member bytes replaced ({name: bytes}), stored as before."""
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_pickles_go_through_the_restricted_reader_everywhere(tmp_path):
    """read_state_dict (convert, DynamicID .bin files, LoRA .bin) never runs what a pickle names."""
    torch = pytest.importorskip("torch")
    from dynamicid_jax.models.torch_import import read_state_dict

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "SAA.bin")
    _refused(read_state_dict, tmp_path / "SAA.bin", "refuses the global posix.mkdir")
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, tmp_path / "ok.ckpt")
    np.testing.assert_array_equal(read_state_dict(tmp_path / "ok.ckpt")["w"], np.arange(3.0, dtype=np.float32))


def test_torch_storage_shorter_than_its_claim_is_refused_before_reading(torch_file):
    from dynamicid_jax.models.torch_import import read_state_dict

    path, storage = torch_file
    _rewrite(path, {storage: b"\0" * 8})
    _refused(read_state_dict, path, "storage 0 holds 8 bytes, 1024 FloatStorage elements expected")


def test_zip_entry_claiming_more_than_the_archive_is_refused(torch_file):
    """A central directory that claims a 4 GiB member in a few-KB archive (a zip bomb's
    signature) is refused before any member is read."""
    from dynamicid_jax.models.torch_import import read_state_dict

    path, storage = torch_file
    raw = bytearray(path.read_bytes())
    entry = raw.find(b"PK\x01\x02")  # central directory entries: name length at +28, name at +46
    while raw[entry + 46:entry + 46 + struct.unpack_from("<H", raw, entry + 28)[0]] != storage.encode():
        entry = raw.find(b"PK\x01\x02", entry + 4)
    raw[entry + 24:entry + 28] = struct.pack("<I", 2**32 - 1)  # its uncompressed size
    path.write_bytes(bytes(raw))
    _refused(read_state_dict, path, "claims 4294967295 bytes")


def test_text_named_bin_is_one_line(tmp_path):
    from dynamicid_jax.models.torch_import import read_state_dict

    (tmp_path / "model.bin").write_text("not a pickle")
    _refused(read_state_dict, tmp_path / "model.bin", "not a torch.save zip archive")


# --------------------------------------------------------------------------- TFRecord, ONNX, JSON


def test_tfrecord_length_past_the_file_is_refused_before_reading(tmp_path):
    """A record whose (CRC-valid) length field claims 2**60 bytes: refused, nothing read."""
    from dynamicid_jax.data import records

    path = tmp_path / "anchor-00000-of-00001.tfrecord"
    with open(path, "wb") as f:
        records.write_record(f, b"payload")
    raw = bytearray(path.read_bytes())
    length = struct.pack("<Q", 2**60)
    raw[0:12] = length + records._masked_crc(length)
    path.write_bytes(bytes(raw))
    _refused(lambda p: list(records.iter_records(p)), path,
             "claims 1152921504606846976 bytes, the file holds 7 more")  # b"payload"


@pytest.mark.parametrize("content, needle", [(b"not a model\n", "not an ONNX model file"),
                                             (b"", "not an ONNX model file (no graph nodes)")])
def test_onnx_files_that_are_not_models(tmp_path, content, needle):
    from dynamicid_jax.faces.onnx_session import create_session

    (tmp_path / "det_10g.onnx").write_bytes(content)
    _refused(create_session, tmp_path / "det_10g.onnx", needle)


def test_json_files_are_size_limited_and_parsed_in_one_line(tmp_path):
    from dynamicid_jax import input_files
    from dynamicid_jax.data import shards
    from dynamicid_jax.models.torch_import import read_state_dict

    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(input_files.read_json, tmp_path / "deep.json", "nested too deeply")
    (tmp_path / "manifest.json").write_text("[1, 2]")
    _refused(shards.read_json, tmp_path / "manifest.json", "holds a JSON list, not an object")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    _refused(read_state_dict, tmp_path / "model.safetensors.index.json", "is not a file name beside the index")
    big = tmp_path / "request.json"
    big.write_text(json.dumps({"prompt": "x" * 2000}))
    _refused(lambda p: input_files.read_json(p, "request file", limit=1000), big,
             "more than the 1000 bytes a request file may hold")


def test_buffalo_mean_shape_pickle_runs_no_code(tmp_path):
    """meanshape_68.pkl in a --faces folder is a pickle too: only a numpy array is read."""
    import pickle

    from dynamicid_jax.faces.buffalo import read_mean_shape

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (tmp_path / "meanshape_68.pkl").write_bytes(pickle.dumps(Payload()))
    _refused(read_mean_shape, tmp_path / "meanshape_68.pkl", "refuses the global posix.mkdir")
    assert not marker.exists()
    (tmp_path / "good.pkl").write_bytes(pickle.dumps(np.arange(204, dtype=np.float32).reshape(68, 3)))
    np.testing.assert_array_equal(read_mean_shape(tmp_path / "good.pkl"), np.arange(204.0).reshape(68, 3))
