"""Our CLIP tokenizer against transformers' CLIPTokenizer on the same vocab/merges files."""

import collections
import json

import numpy as np
import pytest
import transformers

from dynamicid_jax.base_models.sd15 import TEXT_LENGTH
from dynamicid_jax.tokenizer import END_OF_WORD, CLIPTokenizer, bytes_to_unicode, write_tiny_vocab

ODD_PROMPTS = [
    "a photo of the person",
    "",
    "   ",
    "  A  PHOTO\tof\nThe   Person!!! ",
    "face, happy; front-view 123 4.5 don't we'll I'M they're",
    "Café naïve ΟΔΟΣ İstanbul 東京 😀 e\u0301 ﬁ",
    "\u00a0nbsp\u3000ideographic\u2009thin\u200bzero-width",
    "&amp; &lt;tag&gt; ''quoted'' --- ...",
    "<|endoftext|> typed specials <|startoftext|>",
    "a" * 300,
    " ".join(["photo of the person"] * 40),  # far beyond 77 tokens
]

CORPUS = (
    "a photo of a happy person in front view, the face is smiling. portrait, cinematic photo, film, "
    "professional, 4k, highly detailed. the expression is surprised, the face is slightly turned to the left. "
    "in a sad expression, facing up, in side view. two people standing on the beach at sunset. "
    "a woman with red hair and a man wearing glasses, photographed in the studio. "
) * 3


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """A plain BPE learner (most frequent adjacent pair, repeatedly) over CLIP-style words, so the
    merge ranks interact the way a real vocabulary's do."""
    byte_map = bytes_to_unicode()
    words = collections.Counter(
        tuple("".join(byte_map[b] for b in w.encode())[:-1]) + ("".join(byte_map[b] for b in w.encode())[-1] + END_OF_WORD,)
        for w in text.lower().replace(",", " ,").replace(".", " .").split()
    )
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return merges


def write_vocab(folder, merges, pad_token="<|endoftext|>"):
    base = list(bytes_to_unicode().values())
    tokens = base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # bos as an AddedToken record, the form SD1.5's tokenizer_config.json uses
    bos = {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False, "normalized": True,
           "rstrip": False, "single_word": False}
    config = {"bos_token": bos, "eos_token": "<|endoftext|>", "pad_token": pad_token,
              "unk_token": "<|endoftext|>", "model_max_length": 77}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def reference_ids(folder, prompts):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_vocab(tmp_path_factory.mktemp("tiny_tokenizer"), TEXT_LENGTH)


@pytest.fixture(scope="module")
def learned_folder(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("learned") / "tokenizer", learn_merges(CORPUS, 300))


def test_tiny_vocab_matches_transformers(tiny_folder):
    ours = CLIPTokenizer.from_folder(tiny_folder)
    got = ours(ODD_PROMPTS)
    assert got.shape == (len(ODD_PROMPTS), 77) and got.dtype == np.int32
    np.testing.assert_array_equal(got, reference_ids(tiny_folder, ODD_PROMPTS))
    # The tiny vocab really merges: "photo" is one token, not five bytes.
    assert len(ours.encode("photo")) == 1
    assert ours.eos_id == max(ours.vocab.values())  # the legacy argmax pooling rule relies on it


def test_learned_vocab_matches_transformers(learned_folder):
    ours = CLIPTokenizer.from_folder(learned_folder.parent)  # pipeline folder -> tokenizer/
    prompts = ODD_PROMPTS + CORPUS.split(". ")[:6] + ["unseen words: photographers, expressionless, refilm"]
    np.testing.assert_array_equal(ours(prompts), reference_ids(learned_folder, prompts))
    assert len(ours.merge_ranks) > 100  # the corpus runs out of pairs before 300


def test_truncation_keeps_eos_and_padding_uses_configured_token(tmp_path, learned_folder):
    ours = CLIPTokenizer.from_folder(learned_folder)
    long_row, short_row = ours([ODD_PROMPTS[-1], "a photo"])
    assert long_row[0] == ours.bos_id and long_row[-1] == ours.eos_id
    assert np.count_nonzero(long_row == ours.eos_id) == 1
    n = len(ours.encode("a photo"))
    assert short_row[n + 1] == ours.eos_id and (short_row[n + 2 :] == ours.pad_id).all()

    # SD2-style tokenizer: pad token "!" instead of <|endoftext|>.
    bang = write_vocab(tmp_path / "bang", learn_merges(CORPUS, 50), pad_token="!")
    ours_bang = CLIPTokenizer.from_folder(bang)
    assert ours_bang.pad_id == ours_bang.vocab["!"] != ours_bang.eos_id
    np.testing.assert_array_equal(ours_bang(ODD_PROMPTS), reference_ids(bang, ODD_PROMPTS))


def test_clear_errors(tmp_path, tiny_folder):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="pad token '<nope>'"):
        CLIPTokenizer.from_folder(tiny_folder, pad_token="<nope>")
    ours = CLIPTokenizer.from_folder(tiny_folder)
    with pytest.raises(TypeError, match="list of prompts"):
        ours("a photo")
    with pytest.raises(TypeError, match="prompt must be a string"):
        ours(["ok", None])


def test_fix_text_option_cleans_like_openai(tiny_folder):
    """fix_text=True: ftfy + HTML unescaping (OpenAI's cleaning), off by default as in transformers."""
    plain = CLIPTokenizer.from_folder(tiny_folder)
    fixed = CLIPTokenizer.from_folder(tiny_folder, fix_text=True)
    assert fixed.encode("a &amp; b") == plain.encode("a & b") != plain.encode("a &amp; b")
    assert fixed.encode("cafÃ©") == plain.encode("café")  # mojibake repaired by ftfy


def test_sdxl_tokenizer_folders_saved_by_transformers(tmp_path, learned_folder):
    """SDXL's two tokenizers as transformers 5 saves them (tokenizer.json, no vocab.json):
    tokenizer_2's own files name "!" as its pad token, tokenizer 1 pads with <|endoftext|>."""
    pipeline = tmp_path / "sdxl"
    transformers.CLIPTokenizer.from_pretrained(str(learned_folder)).save_pretrained(pipeline / "tokenizer")
    transformers.CLIPTokenizer.from_pretrained(str(learned_folder), pad_token="!").save_pretrained(
        pipeline / "tokenizer_2")
    assert not (pipeline / "tokenizer_2" / "vocab.json").exists() and (pipeline / "tokenizer_2" / "tokenizer.json").is_file()
    ours_1 = CLIPTokenizer.from_folder(pipeline)
    ours_2 = CLIPTokenizer.from_folder(pipeline, subfolder="tokenizer_2")
    assert ours_1.pad_id == ours_1.eos_id and ours_2.pad_id == ours_2.vocab["!"] != ours_2.eos_id
    for ours, sub in ((ours_1, "tokenizer"), (ours_2, "tokenizer_2")):
        np.testing.assert_array_equal(ours(ODD_PROMPTS), reference_ids(pipeline / sub, ODD_PROMPTS))


def test_the_length_comes_from_the_files_or_the_caller(tmp_path):
    """No length is assumed: the folder's model_max_length, else the caller's fallback (the
    text encoder's context); neither is an error naming the folder. Costs < 1 s (no compile)."""
    from dynamicid_jax.input_files import FileFormatError

    folder = write_tiny_vocab(tmp_path / "vocab", 12)
    assert CLIPTokenizer.from_folder(folder, fallback_max_length=30)(["a photo"]).shape == (1, 12)  # the files win
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert CLIPTokenizer.from_folder(folder, fallback_max_length=30)(["a photo"]).shape == (1, 30)
    with pytest.raises(FileFormatError, match="vocab: the tokenizer states no model_max_length"):
        CLIPTokenizer.from_folder(folder)
