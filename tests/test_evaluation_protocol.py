"""The evaluation protocol (the test-set file): its expansion into requests, its errors, and
per-identity masks checked before any model loads. No model: about a second in all."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from _data_helpers import EVAL_SAMPLING as SAMPLING, write_protocol as _write_protocol
from dynamicid_jax.evaluation import Ablation, ProtocolError, expand_cases, load_protocol


def test_example_protocol_expands_deterministically():
    protocol = load_protocol("configs/eval/tiny.json")
    n_ids, n_prompts, n_edits, n_seeds = 3, 3, 3, 3
    single = expand_cases(protocol, "single", Ablation())
    assert len(single) == n_ids * n_prompts * n_edits * n_seeds
    assert len({c.relative_path for c in single}) == len(single)
    assert [c.stem for c in single] == [c.stem for c in expand_cases(protocol, "single", Ablation())]
    assert {c.prompt.kind for c in single} == {"context", "action", "style"}
    first = single[0].sample_request(SAMPLING)
    assert first.prompt == "a photo of a happy man in front view sitting in a cafe"
    assert first.identities[0].face_prompt == "the expression is happy, the face is front view"
    assert first.gating
    # Ablations: no IMR = no face prompt (tokens straight from the projection); no gating.
    no_imr = expand_cases(protocol, "single", Ablation(imr=False))[0].sample_request(SAMPLING)
    assert no_imr.identities[0].face_prompt is None and not no_imr.identities[0].edits
    assert no_imr.prompt == first.prompt  # the text prompt keeps its descriptors
    assert not expand_cases(protocol, "single", Ablation(gating=False))[0].sample_request(SAMPLING).gating
    assert "nogating-noimr" in str(expand_cases(protocol, "single", Ablation(False, False), seeds=(7,))[0].relative_path)
    multi = expand_cases(protocol, "multi", Ablation())
    assert len(multi) == 2 * n_prompts * n_edits * n_seeds
    assert all(a.edit != b.edit for a, b in (c.subjects for c in multi))  # people in one picture differ


def test_protocol_errors_name_the_problem(tmp_path):
    with pytest.raises(ProtocolError, match="expression 'joy'"):
        _write_protocol(tmp_path, {"obama": "obama.jpg"}, edits=[{"expression": "joy", "orientation": "front"}])
    with pytest.raises(ProtocolError, match="reference photo not found.*nobody.jpg"):
        _write_protocol(tmp_path, {"obama": "nobody.jpg"})
    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg"})
    with pytest.raises(ProtocolError, match="no 'groups'"):
        expand_cases(protocol, "multi", Ablation())
    # YAML reads into the same protocol as JSON.
    import yaml
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(json.loads((tmp_path / "t.json").read_text())))
    assert load_protocol(tmp_path / "t.yaml") == protocol


def test_protocol_masks_are_relative_checked_up_front_and_reach_the_requests(tmp_path, capsys):
    """A "mask" per identity, relative to the test-set file; a bad one is one line naming the
    test set and the mask, before any model loads (< 2 s: no model, the demo config only)."""
    sys.path.insert(0, ".")
    from launch import evaluate as cli

    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    Image.fromarray(half).save(tmp_path / "left.png")
    Image.fromarray(half[:, ::-1].copy()).save(tmp_path / "right.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "blank.png")
    protocol = _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, groups=True,
                               masks={"obama": "left.png", "biden": "right.png"})
    assert protocol.identities["obama"].mask == str(tmp_path / "left.png")  # the request parser's resolution
    request = expand_cases(protocol, "multi", Ablation())[0].sample_request(SAMPLING)
    assert [i.mask for i in request.identities] == [str(tmp_path / "left.png"), str(tmp_path / "right.png")]
    assert expand_cases(protocol, "single", Ablation())[1].sample_request(SAMPLING).identities[0].mask \
        == str(tmp_path / "right.png")
    with pytest.raises(ProtocolError, match="only \\['obama'\\] have a 'mask'"):
        _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, groups=True, masks={"obama": "left.png"})
    with pytest.raises(ProtocolError, match="identity 'obama': mask .*nothing.png: file not found"):
        _write_protocol(tmp_path, {"obama": "obama.jpg"}, masks={"obama": "nothing.png"})
    (tmp_path / "typo.json").write_text((tmp_path / "t.json").read_text().replace('"mask"', '"masks"'))
    with pytest.raises(ProtocolError, match="identity 'obama': unknown field\\(s\\) \\['masks'\\]"):
        load_protocol(tmp_path / "typo.json")
    # The picture-dependent checks (empty, aspect ratio, a latent cell) run per group in the CLI.
    _write_protocol(tmp_path, {"obama": "obama.jpg", "biden": "biden.jpg"}, masks={"biden": "blank.png"})
    code = cli.main(["--testset", str(tmp_path / "t.json"), "--out", str(tmp_path / "out"), "--demo",
                     "--metrics_only"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "t.json: biden: identity 0: mask" in err and "blank.png is empty" in err
