"""The whole SDXL sampling path against diffusers' `StableDiffusionXLPipeline`, end to end, on
diffusers' own tiny SDXL (`sdxl_tiny.py`, saved by diffusers, loaded through OUR path:
`loading.load_pipeline(base_model=folder)` detects the family from the files and, with no
DynamicID weights, builds the UNet without the identity branch).

Ours: the pipeline's tokenizers and text program (`family.text_conditioning`), the batch rows
(`batching.assemble`: the negative-zeroing rule and the time ids of `family.request_extras`)
and the one jitted loop + VAE decode (`denoising.denoise`), from the noise `generate` draws.
Theirs: the pipeline called with the same prompts and those latents (`latents=`), output_type
"np". Per deterministic sampler (ddim, euler, dpmpp_2m, dpmpp_2m_karras) x three cases: no
negative prompt (diffusers: zeros for context and pooled vector, force_zeros_for_empty_prompt),
a negative prompt, clip_skip=1 (no negative prompt: diffusers encodes a negative prompt at the
penultimate layer whatever clip_skip says, we apply clip_skip to both prompts as on SD1.5).

Tolerance: relative L2 <= 1e-4 on the decoded image, float32 both sides. The same float32
graph on both sides, differing only in summation order and kernels (a few ulp per op); the
components measured ~5e-7 each (test_sdxl_parity.py) and 3 sampler steps add a few such
errors; the sigma tables differ by float32 vs float64 alpha-bars (<= 1.3e-5 relative at the
smallest sigma, test_samplers.py), which the steps damp. Measured: 3.3e-7 .. 1.3e-6 over the
12 cases (DDIM the largest). Breakages must move the image by more than BROKEN = 1e-3, an
order above the bound's worst and below each (measured: time ids in the wrong order 7.0e-3,
encoder 1's pooled vector 1.4e-2, "" encoded instead of zeros 3.6e-2).

Cost: 37 s warm, 60 s with a cold compilation cache, on 2 shared cores (torch/diffusers
imports, writing the folder, one compile of the loop shared by all 12 cases: one shape, the
sampler a traced index; the breakage test's 32 x 64 shape a second; two text programs, a third
with textual-inversion tables: test_textual_inversion_pairs_match_load_textual_inversion, 7 s).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dynamicid_jax import batching, denoising, loading  # noqa: E402
from dynamicid_jax import schedulers as S  # noqa: E402
from dynamicid_jax.batching import ImageItem  # noqa: E402
from dynamicid_jax.pipeline import DynamicIDPipeline  # noqa: E402
from dynamicid_jax.request import SampleRequest  # noqa: E402
from parity import rel_l2  # noqa: E402
from sdxl_tiny import write_tiny_sdxl  # noqa: E402
from test_samplers import REFERENCE  # noqa: E402

STEPS, GUIDANCE, SIZE, SEED = 3, 5.0, 32, 3
IMAGE_RTOL = 1e-4
BROKEN = 1e-3  # a breakage moves the image by at least this (relative L2); measured >= 7e-3
SAMPLERS = ("ddim", "euler", "dpmpp_2m", "dpmpp_2m_karras")
PROMPT = "a photo of a cat, high quality"
CASES = {  # name: (negative prompt, clip_skip); "" = none given (diffusers: negative_prompt=None)
    "no_negative": ("", 0),
    "negative": ("blurry, low quality", 0),
    "clip_skip_1": ("", 1),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = write_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
    config, ours = loading.load_pipeline(base_model=str(folder))
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder).to(torch.float32)
    theirs.set_progress_bar_config(disable=True)
    # the folder's scheduler_config.json (EulerDiscrete's): each sampler's class is built from it
    return dict(folder=folder, config=config, ours=ours, theirs=theirs, scheduler=dict(theirs.scheduler.config))


def _request(negative: str, clip_skip: int, scheduler: str) -> SampleRequest:
    return SampleRequest(identities=[], prompt=PROMPT, negative_prompt=negative, seed=SEED, steps=STEPS,
                         guidance=GUIDANCE, height=SIZE, width=SIZE, scheduler=scheduler, clip_skip=clip_skip)


def _rows(ours: DynamicIDPipeline, request: SampleRequest) -> dict:
    f = ours.modules.vae_scale_factor
    latent_hwc = (request.height // f, request.width // f, ours.modules.unet.config.in_channels)
    arrays, _ = batching.assemble([ImageItem(request, 0)], ours.conditioning, latent_hwc)
    return arrays


def _our_images(ours: DynamicIDPipeline, request: SampleRequest, rows: dict) -> np.ndarray:
    """What `generate` runs, in float32 (before the uint8 rounding): (1, H, W, 3) in [0, 1]."""
    schedule = S.make_schedule(request.scheduler, ours.scheduler, request.steps)
    images = denoising.denoise(
        {"unet": ours.params["unet"], "vae": ours.params["vae"]}, rows, jnp.int32(S.sampler_index(request.scheduler)),
        schedule, None, jnp.int32(0), modules=ours.modules, gating=request.gating, use_boxes=False, with_mix=False)
    return np.asarray(images) * 0.5 + 0.5


def _diffusers_images(setup, request: SampleRequest, noise) -> np.ndarray:
    pipe = setup["theirs"]
    cls, extra = REFERENCE[request.scheduler]
    pipe.scheduler = cls.from_config({**setup["scheduler"], **extra})
    with torch.no_grad():
        out = pipe(prompt=request.prompt, negative_prompt=request.negative_prompt or None,
                   latents=torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy()),
                   num_inference_steps=request.steps, guidance_scale=request.guidance, height=request.height,
                   width=request.width, clip_skip=request.clip_skip or None, output_type="np")
    return out.images  # (1, H, W, 3) in [0, 1]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SAMPLERS)
def test_whole_loop_matches_stable_diffusion_xl_pipeline(setup, scheduler, case):
    ours = setup["ours"]
    assert ours.modules.family.name == "sdxl" and not ours.modules.identity_branch
    request = _request(*CASES[case], scheduler)
    rows = _rows(ours, request)
    noise, _ = DynamicIDPipeline.initial_noise(request.seed, rows["noise"].shape)
    np.testing.assert_array_equal(rows["noise"], np.asarray(noise))  # the latents generate starts from
    err = rel_l2(_our_images(ours, request, rows), _diffusers_images(setup, request, noise))
    assert err <= IMAGE_RTOL, err


def test_breakages_fail(setup):
    """What the parity must catch: time ids in the wrong order (target size first: a
    non-square size, so the swap changes them), encoder 1's pooled vector for encoder 2's,
    and "" encoded instead of zeros for a missing negative prompt."""
    ours = setup["ours"]
    request = dataclasses.replace(_request("", 0, "euler"), height=SIZE, width=2 * SIZE)
    rows = _rows(ours, request)
    theirs = _diffusers_images(setup, request, rows["noise"])
    assert rel_l2(_our_images(ours, request, rows), theirs) <= IMAGE_RTOL

    cond = rows["conditioning"]
    time_ids = cond.extras["time_ids"]
    swapped = np.concatenate([time_ids[..., 2:4], time_ids[..., :2], time_ids[..., 4:][..., ::-1]], axis=-1)
    broken = {"time ids (crop, original, target reversed)": cond.replace(extras={**cond.extras, "time_ids": swapped})}
    (pos_cond, pos_pooled_1), (neg_cond, neg_pooled_1) = (
        ours.text_features([t]) for t in (request.prompt, ""))
    pooled_1 = np.stack([np.zeros_like(np.asarray(neg_pooled_1[0])), np.asarray(pos_pooled_1[0])])[None]
    broken["pooled vector from encoder 1"] = cond.replace(extras={**cond.extras, "text_embeds": pooled_1})
    encoded_empty = jax.tree.map(lambda a: np.asarray(a[0]), neg_cond)
    broken['"" encoded, not zeros'] = cond.replace(
        context=np.stack([encoded_empty.context, cond.context[0, 1]])[None],
        extras={**cond.extras, "text_embeds": np.stack([np.asarray(encoded_empty.extras["text_embeds"]),
                                                        cond.extras["text_embeds"][0, 1]])[None]})
    for name, conditioning in broken.items():
        err = rel_l2(_our_images(ours, request, dict(rows, conditioning=conditioning)), theirs)
        assert err > BROKEN, (name, err)


def test_time_ids_per_request_match_stable_diffusion_xl_pipeline(setup):
    """original_size / crops_coords_top_left / target_size of the request reach the UNet as
    diffusers' `_get_add_time_ids` builds them: a non-default original size and crop change
    the picture (by more than BROKEN) and equal StableDiffusionXLPipeline(original_size=...,
    crops_coords_top_left=..., target_size=...) within IMAGE_RTOL; the sidecar's `resolved`
    records the six ids used. Cost: ~3 s (the breakage test's 32 x 64 program, no new compile:
    the time ids are traced inputs)."""
    ours, pipe = setup["ours"], setup["theirs"]
    default = dataclasses.replace(_request("", 0, "euler"), height=SIZE, width=2 * SIZE)
    request = dataclasses.replace(default, original_size=[96, 40], crops_coords_top_left=[8, 4],
                                  target_size=[SIZE, 2 * SIZE])
    rows = _rows(ours, request)
    mine = _our_images(ours, request, rows)
    cls, extra = REFERENCE[request.scheduler]
    pipe.scheduler = cls.from_config({**setup["scheduler"], **extra})
    with torch.no_grad():
        theirs = pipe(prompt=request.prompt, latents=torch.from_numpy(rows["noise"].transpose(0, 3, 1, 2).copy()),
                      num_inference_steps=request.steps, guidance_scale=request.guidance, height=request.height,
                      width=request.width, original_size=(96, 40), crops_coords_top_left=(8, 4),
                      target_size=(SIZE, 2 * SIZE), output_type="np").images
    assert rel_l2(mine, theirs) <= IMAGE_RTOL
    assert rel_l2(mine, _our_images(ours, default, _rows(ours, default))) > BROKEN
    _, (details,) = batching.assemble([ImageItem(request, 0)], ours.conditioning, rows["noise"].shape[1:])
    assert details["time_ids"] == [96, 40, 8, 4, SIZE, 2 * SIZE]


def test_separate_vae_folder_replaces_the_base_models_vae(setup, tmp_path):
    """--vae DIR (a diffusers AutoencoderKL folder, as the SDXL fp16-fix VAE ships): its weights
    and ITS scaling_factor (0.5 here, not the base's 0.18215) replace the base's, and the
    pipeline's decode of given latents equals diffusers' `vae.decode(latents / scaling_factor)`
    with that VAE within 1e-5 relative (float32, one decoder: a few ulp per op). A folder that is
    no VAE (the base's unet/) is one line naming it, before any weight loads.
    Cost: ~6 s (one tiny pipeline load, the 4 x 4 latent decoder's compile)."""
    from diffusers import AutoencoderKL

    from dynamicid_jax.request import InputError
    from sdxl_tiny import VAE

    torch.manual_seed(1)  # other weights than the base's VAE
    theirs = AutoencoderKL(**VAE, scaling_factor=0.5).eval()
    theirs.save_pretrained(tmp_path / "vae", safe_serialization=True)
    config, ours = loading.load_pipeline(base_model=str(setup["folder"]), vae=str(tmp_path / "vae"))
    assert config.model.vae.scaling_factor == ours.modules.vae.config.scaling_factor == 0.5
    assert ours.provenance["vae"] == str(tmp_path / "vae")
    latents = np.random.default_rng(0).standard_normal((1, 4, 4, 4)).astype(np.float32)
    scale = ours.modules.vae.config.scaling_factor
    mine = ours.modules.vae.apply({"params": ours.params["vae"]}, jnp.asarray(latents) / scale, method="decode")
    with torch.no_grad():
        reference = theirs.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2)) / 0.5).sample.numpy()
    assert rel_l2(np.asarray(mine), reference.transpose(0, 2, 3, 1)) <= 1e-5

    with pytest.raises(InputError, match=r"--vae .*unet: config.json describes UNet2DConditionModel, not an AutoencoderKL"):
        loading.sampling_config(False, None, str(setup["folder"]), str(setup["folder"] / "unet"))


def test_family_detected_and_sized_from_the_files(setup):
    """The tiny folder is SDXL by its files (text_encoder_2/), its default size the UNet's
    sample_size x the VAE factor (diffusers' default: 32 x 2 = 64 px), its scheduler
    EulerDiscrete's file, force_zeros_for_empty_prompt from model_index.json; the SDXL
    family's tiny config is this architecture."""
    from dynamicid_jax import base_models

    config = setup["config"]
    assert base_models.detect(setup["folder"]) == "sdxl"
    assert config.sampling.height == config.sampling.width == 64
    assert config.model.force_zeros_for_empty_prompt is True
    assert config.model.scheduler.stated_spacing == "leading"
    tiny = base_models.get("sdxl").tiny_model_config()
    for section in ("unet", "vae", "text", "text_2"):
        ours = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model[section].to_dict().items()}
        assert {k: ours[k] for k in tiny[section]} == tiny[section].to_dict(), section
    assert setup["ours"].provenance["identity_branch"] == "absent"


def test_sample_cli_plain_text_to_image_on_the_tiny_sdxl_folder(setup, tmp_path, test_assets, capsys):
    """`launch/sample.py --base_model tiny_sdxl/ --prompt ... --scheduler dpmpp_2m_karras --lora
    style.safetensors:0.8` with no flag naming the family: SDXL from the files, 64 px (the
    files' native size), the LoRA merged into the UNet and bigG, the log and the sidecar say the
    identity branch is absent; time ids given as flags are recorded and `--from_json` makes
    the same bytes; --ref without DynamicID weights is one line, exit 2.
    Cost: ~12 s (one 64 px loop compile; 2 steps, twice)."""
    import json

    from launch import sample as sample_cli

    from safetensors.numpy import save_file

    folder, out = str(setup["folder"]), tmp_path / "out"
    # A kohya SDXL style LoRA: one UNet module in SGM naming (input_blocks_3 = level 1's first
    # attention: conv_in, level 0's resnet and downsampler come before it) and one of the bigG encoder (parity of the merge: test_sdxl_lora.py).
    rng = np.random.default_rng(0)
    style = tmp_path / "style.safetensors"
    save_file({"lora_unet_input_blocks_3_1_proj_in.lora_down.weight": rng.standard_normal((2, 4), np.float32),
               "lora_unet_input_blocks_3_1_proj_in.lora_up.weight": rng.standard_normal((4, 2), np.float32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                   rng.standard_normal((2, 32), np.float32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
                   rng.standard_normal((32, 2), np.float32)}, str(style))
    model = ["--base_model", folder, "--lora", f"{style}:0.8", "--no_progress"]
    assert sample_cli.main(model + ["--prompt", "a cat", "--scheduler", "dpmpp_2m_karras", "--steps", "2",
                                    "--original_size", "128,96", "--crops_coords_top_left", "16,0",
                                    "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "identity branch: absent" in log and "merged 1 UNet and 1 text-encoder modules" in log
    (png,) = out.glob("*.png")
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["weights"]["identity_branch"] == "absent" and sidecar["weights"]["family"] == "sdxl"
    assert (sidecar["request"]["height"], sidecar["request"]["width"]) == (64, 64)
    # the time ids asked for, recorded; target_size left at its default (64, 64)
    assert sidecar["request"]["original_size"] == [128, 96] and "target_size" not in sidecar["request"]
    assert sidecar["resolved"]["time_ids"] == [128, 96, 16, 0, 64, 64]
    # SDXL's default negative prompt is none (zeros by force_zeros_for_empty_prompt), not DynamicID's
    assert sidecar["request"]["negative_prompt"] == ""
    # --from_json makes the same bytes (the same 64 px program: no compile)
    assert sample_cli.main(model + ["--from_json", str(png.with_suffix(".json")), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / png.name).read_bytes() == png.read_bytes()
    assert sidecar["request"]["identities"] == []
    (record,) = sidecar["weights"]["loras"]
    assert record["scale"] == 0.8 and record["merged"] == {"unet": 1, "text_encoder": 0, "text_encoder_2": 1}

    assert sample_cli.main(["--base_model", folder, "--ref", f"{test_assets}/obama.jpg",
                            "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ref needs DynamicID weights" in err[0], err


def test_app_serves_plain_text_to_image_on_a_base_model(setup, tmp_path, monkeypatch):
    """The app on a base model without DynamicID weights (the tiny SDXL): the warm-up compiles
    no identity program (the pipeline has no vision encoder) and one plain program; the page
    hides the people and says why; a request with a photo is one line naming the reason; a
    request without people runs and writes a PNG whose sidecar says the identity branch is
    absent, with the family's empty default negative prompt. In-process (no server, no browser).
    Cost: 25 s measured after the CLI test at load ~9 (gradio's import and the page build, the
    64 px per-step program, 2 steps)."""
    from dynamicid_jax.app import forms
    from dynamicid_jax.app.service import AppService
    from dynamicid_jax.app.ui import build_demo
    from dynamicid_jax.request import InputError

    config, ours = setup["config"], setup["ours"]
    monkeypatch.setattr(ours, "warm_up_identity", lambda: pytest.fail("no identity program on a base model"))
    logs = []
    service = AppService(ours, config.sampling, tmp_path / "out", tmp_path / "uploads", log=logs.append)
    service.warm_up((1, 2))
    compiled = [line for line in logs if line.startswith("compiled")]
    assert len(compiled) == 1 and compiled[0].startswith("compiled 64x64, 1 image(s), 0 people in"), logs
    page = build_demo(service, forms.PLAIN_NOTICE)
    (people,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "people"]
    assert people.visible is False

    settings = dict(prompt="a cat", steps="2")
    photo = tmp_path / "uploads" / "face.png"
    photo.write_bytes(b"")  # never read: refused first
    with pytest.raises(InputError, match="without DynamicID weights .*remove the reference photos"):
        forms.build_request([forms.PersonForm(refs=[str(photo)])], settings, service.upload_root, None,
                            service.settings, identity_branch=False)
    request = forms.build_request([], settings, service.upload_root, None, service.settings, identity_branch=False)
    result = service.run(request)
    sidecar = json.loads(result.sidecars[0].read_text())
    assert sidecar["weights"]["identity_branch"] == "absent" and sidecar["request"]["negative_prompt"] == ""
    assert result.images[0].is_file()


def test_sd15_dynamicid_weights_on_an_sdxl_base_are_refused(setup, tmp_path):
    """The authors' release (SAA.bin ...) is SD1.5's: on an SDXL base one line names both,
    before any weight or face model is read. No compile."""
    from dynamicid_jax.request import InputError

    release = tmp_path / "release"
    release.mkdir()
    (release / "SAA.bin").write_bytes(b"")  # never read
    with pytest.raises(InputError, match="DynamicID weights are for SD1.5.* is sdxl"):
        loading.load_pipeline(base_model=str(setup["folder"]), vision_encoder=str(tmp_path), dynamicid=str(release))


def test_textual_inversion_pairs_match_load_textual_inversion(setup, tmp_path):
    """SDXL embedding files (clip_l + clip_g) through OUR path (`pipeline.embedding`: the
    family's widths; `family.tokenize`: a table per encoder; `text_conditioning`) against
    diffusers: `load_textual_inversion(state_dict["clip_l"], text_encoder, tokenizer)` and
    clip_g into text_encoder_2 / tokenizer_2 (its documented SDXL recipe), then
    `encode_prompt`. A 2-vector and a 3-vector embedding, one in each prompt.

    prompt_embeds (B, 77, 64): relative L2 <= IMAGE_RTOL (1e-4), float32 both sides. The
    embedding rows and every other token id are equal on both sides (checked), so each
    encoder gets the same input and the states differ by float32 rounding of two
    implementations of the same 5-layer encoders (the text encoders' parity, ~5e-7).
    Pooled (text_embeds): diffusers' tiny (and real) encoders pool with transformers' legacy
    argmax(input_ids), which lands on its added token ids (they exceed the EOS id); ours
    pools at the EOS as CLIP was trained (A1111's and ComfyUI's choice), so the reference is
    their own text_encoder_2's projected last state at the EOS (diffusers' own pooled vector
    is 0.9 / 1.4 away). Measured: context 2.7e-7 / 2.6e-7, pooled 2.8e-7 / 2.7e-7. Breakages
    must exceed BROKEN (1e-3): clip_g's vectors zeroed (measured 0.52 / 0.34), clip_l and
    clip_g swapped (0.56 / 0.55; the tiny encoders are both 32-d, on real SDXL a swap is a
    width error, test_textual_inversion.py).

    Cost: 7 s warm beside the module's fixture (a fresh diffusers pipeline for its mutated tokenizers, one new text program:
    both tiny encoders with tables, batch 1, shared by every call here)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    ours, folder = setup["ours"], setup["folder"]
    widths = ours.modules.family.embedding_widths(ours.modules)
    pairs = {name: {"clip_l": rng.standard_normal((n, widths[0])).astype(np.float32),
                    "clip_g": rng.standard_normal((n, widths[1])).astype(np.float32)}
             for name, n in (("stylex", 2), ("badhands", 3))}
    variants = {"good": lambda p: p, "zeroed_clip_g": lambda p: dict(p, clip_g=np.zeros_like(p["clip_g"])),
                "swapped": lambda p: {"clip_l": p["clip_g"], "clip_g": p["clip_l"]}}
    files = {}
    for variant, change in variants.items():
        (tmp_path / variant).mkdir()
        files[variant] = [str(tmp_path / variant / f"{name}.safetensors") for name in pairs]
        for name, path in zip(pairs, files[variant]):
            save_file(change(pairs[name]), path)
    prompt, negative = "a stylex photo of a cat, high quality", "lowres, badhands"

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder).to(torch.float32)  # not setup's: mutated
    for name, pair in pairs.items():
        pipe.load_textual_inversion(torch.from_numpy(pair["clip_l"]), token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(torch.from_numpy(pair["clip_g"]), token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        want, want_negative, _, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"), negative_prompt=negative)
    want_ids, want_pooled = [], []
    for text in (prompt, negative):
        ids = [tok(pipe.maybe_convert_prompt(text, tok), padding="max_length", max_length=77, truncation=True,
                   return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
        eos = int((ids[1][0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
        with torch.no_grad():
            out = pipe.text_encoder_2(ids[1], output_hidden_states=True)
            want_pooled.append(pipe.text_encoder_2.text_projection(out.last_hidden_state[:, eos]).numpy())
        want_ids.append(np.stack([i.numpy() for i in ids], axis=1))

    def ours_of(variant, text):
        conditioning, _ = ours.text_features([text], 0, files[variant])
        return np.asarray(conditioning.context), np.asarray(conditioning.extras["text_embeds"])

    vocab = ours.modules.text_encoder.config.vocab_size
    for text, ids_want, context_want, pooled_want in zip((prompt, negative), want_ids, (want, want_negative),
                                                         want_pooled):
        ids, _ = ours.modules.family.tokenize(ours.tokenizer, [text], [ours.embedding(f) for f in files["good"]],
                                              ours.modules)
        added = ids >= vocab
        base_vocab = len(setup["theirs"].tokenizer)  # the unmutated pipeline's: diffusers' added ids start there
        assert np.array_equal(added, ids_want >= base_vocab) and added.sum() in (2 * 2, 2 * 3)  # n per tokenizer
        assert np.array_equal(ids[~added], ids_want[~added])
        context, pooled = ours_of("good", text)
        assert rel_l2(context, context_want.numpy()) <= IMAGE_RTOL, rel_l2(context, context_want.numpy())
        assert rel_l2(pooled, pooled_want) <= IMAGE_RTOL, rel_l2(pooled, pooled_want)
        for variant in ("zeroed_clip_g", "swapped"):
            err = rel_l2(ours_of(variant, text)[0], context_want.numpy())
            assert err > BROKEN, (variant, err)
