"""Make pictures with DynamicID: one reference photo per person, boxes, expression edits.

Real weights (SD1.5 folder or single file, CLIP ViT-H/14 image encoder, the authors' release
folder with SAA.bin/IMR.bin/key_point_encoder.bin, insightface buffalo_l):

  python launch/sample.py --base_model sd15/ --vision_encoder image_encoder/ \
      --dynamicid dynamicid_release/ --faces buffalo_l/ \
      --ref alice.jpg --ref bob.jpg --box 0,0,1,0.5 --box 0,0.5,1,1 \
      --face_prompt "" --face_prompt "a very surprised expression, front view" \
      --prompt "two people at a cafe, cinematic photo" --height 768 --width 768 --out out/

Several photos of one person: `--ref a1.jpg,a2.jpg` (their tokens are averaged).
Per-identity options (--box, --face_prompt, --source_prompt, --target_landmarks) are given
once per identity in --ref order; an empty --face_prompt leaves that identity unedited.
Boxes are normalised y_min,x_min,y_max,x_max. Without boxes several identities get vertical
strips. Each PNG gets a JSON sidecar; `--from_json SIDECAR` reproduces it.

Many pictures: `--requests FILE.jsonl` holds one request per line in the sidecar's `request`
form (photo paths relative to the file; see dynamicid_jax/generation/requests.py). Requests
sharing a compiled shape are batched (`--batch_size` images per step, default one per
device), the batch split over every local device; pictures go to OUT/lineNNNNN-SEED-K.png,
unusable lines to OUT/rejects.jsonl, counts to OUT/summary.json. Rerunning the same command
skips finished pictures. Over several hosts, the same command on each with the flags of
launch/train.py (each process takes a disjoint share, all write into --out):

  python launch/sample.py --requests jobs.jsonl --out shared/out --batch_size 64 \
      --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK ...

No weights at hand: `--demo` runs a tiny random model (noise-like pictures, said plainly).
Bad input exits with status 2 and one line on stderr naming it. `--verbose` shows the libraries'
INFO logs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time



def parse_args(argv=None) -> argparse.Namespace:
    from dynamicid_jax.cli import ArgumentParser, add_model_args

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", action="append", default=[], help="reference photo(s) of one identity; repeat per identity")
    p.add_argument("--prompt", default="a photo of a person")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--box", action="append", default=[], help="y_min,x_min,y_max,x_max in [0,1], once per identity")
    p.add_argument("--face_prompt", action="append", default=[], help="target face prompt per identity ('' = none)")
    p.add_argument("--source_prompt", action="append", default=[], help="reference-face description per identity")
    p.add_argument("--target_landmarks", action="append", default=[], help="photo giving target landmarks, per identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_images", type=int, default=1)
    p.add_argument("--alpha", default=None, help="layout steps (int, e.g. 3) or fraction of the steps in (0, 1] (e.g. 0.24)")
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--id_scale", type=float, default=None)
    p.add_argument("--mix", type=float, default=None, help="identity mixing weight m (one box, several identities)")
    p.add_argument("--no_gating", action="store_true", help="ablation: plain decoupled cross-attention")
    add_model_args(p)
    p.add_argument("--from_json", default=None, help="sidecar JSON of an earlier image: reproduce its request")
    p.add_argument("--out", default="outputs")
    p.add_argument("--requests", default=None, help="JSON Lines file, one request per line (batch generation)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="with --requests: images per denoising step over all processes (default: one per device)")
    p.add_argument("--fsdp", type=int, default=1,
                   help="with --requests: split parameters over this many devices (when a copy per device does not fit)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    from dynamicid_jax import distributed

    distributed.add_argparse_flags(p)
    return p.parse_args(argv)


def _per_identity(values: list[str], n: int, flag: str) -> list:
    if len(values) > n:
        raise _input_error(f"{flag} given {len(values)} times for {n} identities")
    return [v if v else None for v in values] + [None] * (n - len(values))


def _input_error(message: str):
    from dynamicid_jax.request import InputError

    return InputError(message)


def _parse_box(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise _input_error(f"--box {text!r}: expected 4 comma-separated numbers y_min,x_min,y_max,x_max")
    return values


def parse_alpha(text: str) -> int | float:
    """--alpha: an int step count ("12") or a float fraction of the steps ("0.24", "1e-1")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise _input_error(f"--alpha {text!r}: expected a step count (e.g. 12) or a fraction in (0, 1] "
                           "(e.g. 0.24)") from None


def read_sidecar(path: str):
    """The SampleRequest of a sidecar (or bare request) JSON file; InputError naming the file."""
    from dynamicid_jax.request import InputError, SampleRequest

    file = pathlib.Path(path)
    if not file.is_file():
        raise _input_error(f"--from_json {file}: {'is a folder' if file.is_dir() else 'file not found'}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _input_error(f"--from_json {file}: not a JSON file ({e})") from None
    try:
        request = SampleRequest.from_json(data.get("request", data) if isinstance(data, dict) else data)
    except InputError as e:
        raise _input_error(f"--from_json {file}: {e}") from None
    _check_recorded_embeddings(data, file)
    return request


def _check_recorded_embeddings(sidecar, file) -> None:
    """The embedding files a sidecar names must be the bytes it was made with (sha256)."""
    import hashlib

    recorded = sidecar.get("resolved", {}).get("negative_embeddings", []) if isinstance(sidecar, dict) else []
    for record in recorded:
        path = pathlib.Path(record["file"])
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != record["sha256"]:
            raise _input_error(f"--from_json {file}: embedding {path} changed since (sha256 differs from the sidecar's)")


def build_request(args: argparse.Namespace, sampling_defaults):
    from dynamicid_jax.request import IdentityRequest, SampleRequest

    if args.from_json:
        return read_sidecar(args.from_json)
    n = len(args.ref)  # none: plain text-to-image, which validate_request allows without DynamicID weights only
    if args.box and len(args.box) != n:
        raise _input_error(f"boxes and identities differ in count: {len(args.box)} --box for {n} --ref")
    boxes = [_parse_box(b) for b in args.box] or [None] * n
    face_prompts = _per_identity(args.face_prompt, n, "--face_prompt")
    source_prompts = _per_identity(args.source_prompt, n, "--source_prompt")
    targets = _per_identity(args.target_landmarks, n, "--target_landmarks")
    identities = [
        IdentityRequest(refs=[r for r in ref.split(",") if r], box=box, face_prompt=fp, source_prompt=sp,
                        target_landmarks=tl)
        for ref, box, fp, sp, tl in zip(args.ref, boxes, face_prompts, source_prompts, targets)
    ]
    alpha = sampling_defaults.alpha if args.alpha is None else parse_alpha(args.alpha)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return SampleRequest(
        identities=identities,
        prompt=args.prompt,
        negative_prompt=pick(args.negative_prompt, sampling_defaults.negative_prompt),
        seed=args.seed,
        steps=pick(args.steps, sampling_defaults.steps),
        guidance=pick(args.guidance, sampling_defaults.guidance),
        height=pick(args.height, sampling_defaults.height),
        width=pick(args.width, sampling_defaults.width),
        num_images=args.num_images,
        alpha=alpha,
        beta=pick(args.beta, sampling_defaults.beta),
        id_scale=pick(args.id_scale, sampling_defaults.id_scale),
        mix=args.mix,
        gating=not args.no_gating,
        scheduler=pick(args.scheduler, sampling_defaults.scheduler),
        clip_skip=args.clip_skip,
        negative_embeddings=list(args.negative_embedding),
    )


def _loras(args) -> list:
    """--lora FILE[:SCALE] values as (path, scale); InputError naming a missing file."""
    from dynamicid_jax.models.lora_files import parse_lora_arg

    loras = [parse_lora_arg(t) for t in args.lora]
    for path, _ in loras:
        if not pathlib.Path(path).is_file():
            raise _input_error(f"--lora: file not found: {path}")
    return loras


def run_requests(args) -> int:
    """--requests: every line of the file, batched over every device and process."""
    from dynamicid_jax import distributed
    from dynamicid_jax.generation import run_requests_file
    from dynamicid_jax.loading import load_pipeline, sampling_config

    if args.ref or args.from_json:
        raise _input_error("--requests takes every request from its file: drop --ref/--from_json")
    if args.batch_size is not None and args.batch_size < 1:
        raise _input_error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.fsdp < 1:
        raise _input_error(f"--fsdp must be >= 1, got {args.fsdp}")
    if not pathlib.Path(args.requests).is_file():
        raise _input_error(f"requests file not found: {args.requests}")
    loras = _loras(args)
    distributed.initialize_from_args(args)
    import jax

    main_process = jax.process_index() == 0
    config = sampling_config(args.demo, args.dynamicid, args.base_model)
    _, pipeline = load_pipeline(
        demo=args.demo, base_model=args.base_model, vision_encoder=args.vision_encoder,
        dynamicid=args.dynamicid, faces=args.faces, expression_model=args.expression_model, dtype=args.dtype,
        log=lambda m: print(m, flush=True) if main_process else None, loras=loras,
        lora_skip_unknown=args.lora_skip_unknown,
    )
    summary = run_requests_file(pipeline, args.requests, args.out, defaults=config.sampling.to_dict(),
                                batch_size=args.batch_size, fsdp=args.fsdp, progress=not args.no_progress)
    if main_process:
        print(f"{summary['images']} images of {summary['requests']} requests: {summary['generated']} generated, "
              f"{summary['reused']} already there, {len(summary['rejected_lines'])} line(s) rejected; "
              f"wrote {args.out}/summary.json")
    return 0


def main(argv=None) -> int:
    """The CLI: 0 on success, 2 (one stderr line) on a user error; see the module docstring."""
    from dynamicid_jax import cli

    args = parse_args(argv)
    cli.quiet_logs(args.verbose)
    return cli.run_main(_run, args)


def _run(args: argparse.Namespace) -> int:
    from dynamicid_jax.cli import check_output_folder

    if args.requests:
        check_output_folder(args.out, "--out")
        return run_requests(args)
    from dynamicid_jax.loading import identity_branch, load_pipeline, sampling_config
    from dynamicid_jax.outputs import save_outputs
    from dynamicid_jax.request import check_embeddings_readable, check_images_readable, validate_request

    # Everything checkable without models first: a typo must not cost a model load.
    check_output_folder(args.out, "--out")
    config = sampling_config(args.demo, args.dynamicid, args.base_model)
    request = build_request(args, config.sampling)
    validate_request(request, 2 ** (len(config.model.vae.block_out_channels) - 1),
                     identity_branch(args.demo, args.dynamicid))
    check_images_readable(request)
    check_embeddings_readable(request, config.model.text.get("hidden_size"))
    loras = _loras(args)
    _, pipeline = load_pipeline(
        demo=args.demo, base_model=args.base_model, vision_encoder=args.vision_encoder,
        dynamicid=args.dynamicid, faces=args.faces, expression_model=args.expression_model, dtype=args.dtype,
        log=lambda m: print(m, flush=True), loras=loras, lora_skip_unknown=args.lora_skip_unknown,
    )
    from tqdm import tqdm

    bar = {}

    def progress(total):
        bar["tqdm"] = tqdm(total=total, desc="denoising", unit="step")
        return lambda: bar["tqdm"].update(1)

    start = time.time()
    try:
        images, details = pipeline.generate(request, progress=progress)
    finally:
        if "tqdm" in bar:
            bar["tqdm"].close()
    try:
        paths = save_outputs(args.out, images, request, details, pipeline.provenance)
    except OSError as e:  # disk full, read-only: one line, not a traceback
        from dynamicid_jax.errors import StorageError

        raise StorageError(f"--out {args.out}: writing the pictures failed: {e}") from e
    print(f"wrote {', '.join(str(p) for p in paths)} (+ .json sidecars) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
