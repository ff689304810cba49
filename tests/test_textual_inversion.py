"""Textual-inversion embeddings: the torch-free .pt reader against real torch.save files (and
its refusal of any other global), the file layouts, and text-encoder outputs equal to
diffusers' `load_textual_inversion` on a tiny random CLIP text model and tokenizer.
"""

import collections
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from safetensors.numpy import save_file  # noqa: E402

from dynamicid_jax.models import load_text_encoder, textual_inversion, torch_pickle  # noqa: E402
from dynamicid_jax.base_models.sd15 import TEXT_LENGTH  # noqa: E402
from dynamicid_jax.tokenizer import CLIPTokenizer, write_tiny_vocab  # noqa: E402
from parity import rel_l2  # noqa: E402
from test_single_file import randomise_  # noqa: E402

WIDTH = 32
# Relative L2 of the text states, float32 both sides (the bound). The embedding rows
# and every other token's id are equal on both sides (checked), so the transformer gets the
# same input bit for bit and the states differ only by float32 rounding of two
# implementations of the same 2-layer model: measured about 3e-7, a margin of >300x.
STATES_RTOL = 1e-4


def _a1111_pt(path, vectors, name="x"):
    """An embedding as A1111's trainer saves it (a tensor that requires grad, extra fields)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.from_numpy(vectors).requires_grad_()},
                "name": name, "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    return path


def test_torch_pickle_reads_torch_save_and_refuses_other_globals(tmp_path):
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32))
    saved = {"plain": base, "view": base[1:, ::2].t(), "half": base.half(), "bf16": base.bfloat16()[:, 1:3],
             "param": torch.nn.Parameter(base.clone()), "long": torch.arange(5), "state": torch.nn.Linear(3, 2).state_dict(),
             "meta": {"step": 7, "name": "n", "shape": (1, 2)}}
    torch.save(saved, tmp_path / "a.pt")
    got = torch_pickle.load(tmp_path / "a.pt")
    for key in ("plain", "view", "half", "long"):
        assert got[key].dtype == saved[key].numpy().dtype and np.array_equal(got[key], saved[key].numpy())
    assert np.array_equal(got["bf16"].astype(np.float32), saved["bf16"].float().numpy())
    assert np.array_equal(got["param"], base.numpy()) and isinstance(got["state"], collections.OrderedDict)
    assert np.array_equal(got["state"]["weight"], saved["state"]["weight"].numpy()) and got["meta"] == saved["meta"]

    marker = tmp_path / "ran"

    class Payload:  # what a malicious file does: call any function while unpickling
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"string_to_param": {"*": base}, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(torch_pickle.TorchPickleError, match=r"evil\.pt: refuses the global posix\.mkdir"):
        torch_pickle.load(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"a": base}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(torch_pickle.TorchPickleError, match="legacy"):
        torch_pickle.load(tmp_path / "legacy.pt")


def test_every_layout_reads_and_a_wrong_width_is_named(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((3, WIDTH)).astype(np.float32)
    one = vectors[0]
    files = {
        _a1111_pt(tmp_path / "a1111.pt", vectors): vectors,
        tmp_path / "emb.safetensors": vectors,  # A1111's safetensors: {"emb_params": (n, D)}
        tmp_path / "learned_embeds.safetensors": one[None],  # diffusers: {token: (D,)}
        tmp_path / "learned_embeds.bin": one[None],
    }
    save_file({"emb_params": vectors}, str(tmp_path / "emb.safetensors"))
    save_file({"<cat-toy>": one}, str(tmp_path / "learned_embeds.safetensors"))
    import safetensors.torch  # bfloat16, which safetensors' numpy reader refuses

    safetensors.torch.save_file({"emb_params": torch.from_numpy(vectors).bfloat16()}, str(tmp_path / "bf16.safetensors"))
    files[tmp_path / "bf16.safetensors"] = torch.from_numpy(vectors).bfloat16().float().numpy()
    torch.save({"<cat-toy>": torch.from_numpy(one)}, tmp_path / "learned_embeds.bin")
    for path, want in files.items():
        got = textual_inversion.read_embedding(path, (WIDTH,))
        (vectors,) = got.vectors
        assert got.name == path.stem and np.array_equal(vectors, want) and len(got.sha256) == 64
    save_file({"emb_params": rng.standard_normal((2, 48)).astype(np.float32)}, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(textual_inversion.EmbeddingFileError, match=r"sd2\.safetensors: 48-d .* text encoder is 32-d"):
        textual_inversion.read_embedding(tmp_path / "sd2.safetensors", (WIDTH,))
    save_file({"a": one, "b": one}, str(tmp_path / "two.safetensors"))
    with pytest.raises(textual_inversion.EmbeddingFileError, match=r"two\.safetensors: no embedding"):
        textual_inversion.read_embedding(tmp_path / "two.safetensors", (WIDTH,))


def test_sdxl_pairs_read_and_the_wrong_form_or_width_is_named(tmp_path):
    """SDXL files (clip_l + clip_g) against the widths the family asks for, here (32, 48) as
    (768, 1280) on SDXL: read as the pair; swapped, a single-encoder file, a pair where one
    encoder is wanted, unequal counts: one line naming the file. No model: well under 1 s."""
    rng = np.random.default_rng(4)
    clip_l, clip_g = rng.standard_normal((2, WIDTH)).astype(np.float32), rng.standard_normal((2, 48)).astype(np.float32)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "pair.safetensors"))
    got = textual_inversion.read_embedding(tmp_path / "pair.safetensors", (WIDTH, 48))
    assert got.count == 2 and np.array_equal(got.vectors[0], clip_l) and np.array_equal(got.vectors[1], clip_g)
    assert got.record()["vectors"] == 2
    save_file({"clip_l": clip_g, "clip_g": clip_l}, str(tmp_path / "swapped.safetensors"))
    save_file({"emb_params": clip_l}, str(tmp_path / "single.safetensors"))
    save_file({"clip_l": clip_l, "clip_g": clip_g[:1]}, str(tmp_path / "uneven.safetensors"))
    refused = {
        ("swapped", (WIDTH, 48)): r"swapped\.safetensors: clip_l vectors are 48-d, but text_encoder is 32-d",
        ("single", (WIDTH, 48)): r"single\.safetensors: a single-encoder embedding \(32-d vectors\), .* needs an SDXL",
        ("pair", (WIDTH,)): r"pair\.safetensors: an SDXL embedding \(clip_l \+ clip_g\), but the base model has one",
        ("uneven", None): r"uneven\.safetensors: clip_l has 2 vectors but clip_g 1",
    }
    for (name, widths), message in refused.items():
        with pytest.raises(textual_inversion.EmbeddingFileError, match=message):
            textual_inversion.read_embedding(tmp_path / f"{name}.safetensors", widths)


def test_names_are_appended_once_and_matched_as_whole_words(tmp_path):
    assert textual_inversion.with_names("lowres", ["badhands", "EasyNeg"]) == "lowres, badhands, EasyNeg"
    assert textual_inversion.with_names("lowres, badhands, EasyNeg", ["badhands", "EasyNeg"]) == \
        "lowres, badhands, EasyNeg"
    assert textual_inversion.with_names("", ["badhands"]) == "badhands"
    tokenizer = CLIPTokenizer.from_folder(write_tiny_vocab(tmp_path / "vocab", TEXT_LENGTH))
    emb = textual_inversion.TextualInversion("BadHands", (np.ones((2, 4), np.float32),), "BadHands.pt", "0" * 64)
    upper, _ = textual_inversion.tokenize(tokenizer, "a photo, BADHANDS", [emb], 1000, 4)
    lower, table = textual_inversion.tokenize(tokenizer, "a photo, badhands", [emb], 1000, 4)
    inside, _ = textual_inversion.tokenize(tokenizer, "a photo, xbadhands", [emb], 1000, 4)
    assert np.array_equal(upper, lower) and (lower >= 1000).sum() == 2 and table[:2].sum() == 8
    assert (inside >= 1000).sum() == 0  # part of another word: not the embedding


class _Loader(diffusers.loaders.TextualInversionLoaderMixin):
    """The least of a pipeline diffusers' loader needs (no offload hooks, no components)."""

    hf_device_map = None
    components = {}


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ti_text")
    vocab = write_tiny_vocab(folder / "tokenizer", TEXT_LENGTH)
    ours_tok = CLIPTokenizer.from_folder(vocab)
    config = transformers.CLIPTextConfig(
        vocab_size=len(ours_tok.vocab), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=ours_tok.bos_id,
        eos_token_id=2, pad_token_id=ours_tok.pad_id)  # eos 2: SD1.5's legacy pooling rule
    model = transformers.CLIPTextModel(config).eval()
    randomise_(model, 3)
    model.save_pretrained(folder / "text_encoder")
    module, params = load_text_encoder(folder / "text_encoder")
    encode = jax.jit(lambda p, ids, extra: module.apply({"params": p}, ids, 0, extra))
    return dict(folder=folder, tokenizer=ours_tok, params=params, encode=encode, vocab_size=config.vocab_size)


def _ours(tiny, texts, embeddings):
    rows = [textual_inversion.tokenize(tiny["tokenizer"], t, embeddings, tiny["vocab_size"], WIDTH) for t in texts]
    ids, tables = (np.stack(a) for a in zip(*rows))
    states, pooled = tiny["encode"](tiny["params"], ids, tables)
    return ids, np.asarray(states), np.asarray(pooled)


def test_text_states_equal_diffusers_load_textual_inversion(tiny_text, tmp_path):
    rng = np.random.default_rng(2)
    files = [_a1111_pt(tmp_path / "badhands.pt", rng.standard_normal((3, WIDTH)).astype(np.float32), name="other"),
             tmp_path / "stylex.safetensors"]
    save_file({"emb_params": rng.standard_normal((2, WIDTH)).astype(np.float32)}, str(files[1]))
    embeddings = [textual_inversion.read_embedding(f, (WIDTH,)) for f in files]
    texts = [textual_inversion.with_names("lowres, blurry", ["badhands"]),  # appended: "lowres, blurry, badhands"
             "a stylex photo of the person, badhands", "a photo of the person"]

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tiny_text["folder"] / "tokenizer"))
    text_encoder = transformers.CLIPTextModel.from_pretrained(str(tiny_text["folder"] / "text_encoder")).eval()
    loader = _Loader()
    loader.load_textual_inversion([str(f) for f in files], token=["badhands", "stylex"], tokenizer=tokenizer,
                                  text_encoder=text_encoder)
    want_ids = tokenizer(loader.maybe_convert_prompt(texts, tokenizer), padding="max_length", max_length=77,
                         truncation=True, return_tensors="np").input_ids
    with torch.no_grad():
        want = text_encoder(torch.from_numpy(want_ids).long()).last_hidden_state.numpy()

    ids, states, pooled = _ours(tiny_text, texts, embeddings)
    vocab = tiny_text["vocab_size"]
    added = ids >= vocab
    # Same tokens: embedding tokens at the same places (5 + 2 of them), every other id equal.
    assert np.array_equal(added, want_ids >= vocab) and added.sum(axis=1).tolist() == [3, 5, 0]
    assert np.array_equal(ids[~added], want_ids[~added])
    assert rel_l2(states, want) <= STATES_RTOL
    # Pooling at the EOS (transformers' legacy argmax rule would land on an embedding token).
    eos = np.argmax(np.where(added, 0, ids), axis=1)
    assert np.array_equal(pooled, states[np.arange(3), eos])

    # A deliberate breakage, the vectors in the wrong order: measured 0.2, far outside the bound.
    flipped = [textual_inversion.TextualInversion(e.name, (e.vectors[0][::-1],), e.path, e.sha256) for e in embeddings]
    _, broken, _ = _ours(tiny_text, texts, flipped)
    assert rel_l2(broken[:2], want[:2]) > 30 * STATES_RTOL


def test_requests_file_lines_take_embeddings_relative_to_the_file(tmp_path, test_assets):
    import json

    from dynamicid_jax.generation.requests import read_requests

    (tmp_path / "emb").mkdir()
    save_file({"emb_params": np.ones((2, WIDTH), np.float32)}, str(tmp_path / "emb" / "badhands.safetensors"))
    base = {"identities": [{"refs": [str(test_assets / "obama.jpg")]}], "negative_prompt": "blurry"}
    lines = [dict(base, negative_embeddings=["emb/badhands.safetensors"]), dict(base, negative_embeddings=["emb/no.pt"]),
             dict(base, negative_embeddings="emb/badhands.safetensors")]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    requests, rejects = read_requests(tmp_path / "jobs.jsonl")
    (number, request), = requests
    assert number == 1 and request.negative_embeddings == [str(tmp_path / "emb" / "badhands.safetensors")]
    assert request.negative_prompt == "blurry, badhands"
    assert [r.line for r in rejects] == [2, 3]
    assert "no.pt" in rejects[0].error and "list of embedding file paths" in rejects[1].error
