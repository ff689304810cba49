"""Make pictures with DynamicID: one reference photo per person, boxes, expression edits.

Real weights (SD1.5 folder or single file, CLIP ViT-H/14 image encoder, the authors' release
folder with SAA.bin/IMR.bin/key_point_encoder.bin, insightface buffalo_l):

  python launch/sample.py --base_model sd15/ --vision_encoder image_encoder/ \
      --dynamicid dynamicid_release/ --faces buffalo_l/ \
      --ref alice.jpg --ref bob.jpg --box 0,0,1,0.5 --box 0,0.5,1,1 \
      --face_prompt "" --face_prompt "a very surprised expression, front view" \
      --prompt "two people at a cafe, cinematic photo" --height 768 --width 768 --out out/

Several photos of one person: `--ref a1.jpg,a2.jpg` (their tokens are averaged).
Per-identity options (--box, --mask, --face_prompt, --source_prompt, --target_landmarks) are
given once per identity in --ref order; an empty --face_prompt leaves that identity unedited.
Boxes are normalised y_min,x_min,y_max,x_max; `--mask PERSON.png` gives a region of any
shape instead (white = region, the picture's aspect ratio). Without boxes or masks several
identities get vertical strips. Each PNG gets a JSON sidecar; `--from_json SIDECAR` reproduces it. Like --requests
below (the same engine), a rerun keeps a picture already in --out with the same request and
weights, and refuses to overwrite one made with other settings.

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
import pathlib
import sys
import time



def parse_args(argv=None) -> argparse.Namespace:
    from dynamicid_jax.cli import ArgumentParser, add_model_args
    from dynamicid_jax.request_parsing import add_request_args

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_request_args(p)
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


def _input_error(message: str):
    from dynamicid_jax.request import InputError

    return InputError(message)


def build_request(args: argparse.Namespace, sampling_defaults):
    """The request of the flags, or of --from_json's sidecar (`dynamicid_jax.request_parsing`)."""
    from dynamicid_jax.request_parsing import flags_request, read_sidecar

    if args.from_json:
        return read_sidecar(args.from_json)
    return flags_request(args, dict(sampling_defaults))


def run_requests(args) -> int:
    """--requests: every line of the file, batched over every device and process."""
    from dynamicid_jax import distributed
    from dynamicid_jax.cli import lora_files, pipeline_args
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
    lora_files(args.lora)  # a missing file fails before any model loads
    distributed.initialize_from_args(args)
    import jax

    main_process = jax.process_index() == 0
    config = sampling_config(args.demo, args.dynamicid, args.base_model, args.vae)
    _, pipeline = load_pipeline(**pipeline_args(args), log=lambda m: print(m, flush=True) if main_process else None)
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
    from dynamicid_jax.cli import check_output_folder, lora_files, pipeline_args

    if args.requests:
        check_output_folder(args.out, "--out")
        return run_requests(args)
    from dynamicid_jax import base_models
    from dynamicid_jax.generation import RequestSampler, run_request
    from dynamicid_jax.loading import embedding_widths, identity_branch, load_pipeline, sampling_config
    from dynamicid_jax.request import check_embeddings_readable, check_images_readable, validate_request

    # Everything checkable without models first: a typo must not cost a model load.
    check_output_folder(args.out, "--out")
    config = sampling_config(args.demo, args.dynamicid, args.base_model, args.vae)
    request = build_request(args, config.sampling)
    validate_request(request, 2 ** (len(config.model.vae.block_out_channels) - 1),
                     identity_branch=identity_branch(args.demo, args.dynamicid), family=base_models.of(config.model))
    check_images_readable(request)
    check_embeddings_readable(request, embedding_widths(config.model))
    lora_files(args.lora)  # a missing file fails before any model loads
    _, pipeline = load_pipeline(**pipeline_args(args), log=lambda m: print(m, flush=True))
    from tqdm import tqdm

    bar = {}

    def progress(total):
        bar["tqdm"] = tqdm(total=total, desc="denoising", unit="step")
        return lambda: bar["tqdm"].update(1)

    # Without a bar, no per-step report: the denoising program then has no host callback, so
    # it is read from the persistent compile cache on the next start (dynamicid_jax/denoising.py).
    sampler = RequestSampler(pipeline, request, None if args.no_progress else progress)
    start = time.time()
    try:  # the engine of --requests: finished pictures reused, each written atomically
        stats = run_request(pipeline, request, args.out, sampler=sampler)
    except OSError as e:  # disk full, read-only: one line, not a traceback
        from dynamicid_jax.errors import StorageError

        raise StorageError(f"--out {args.out}: writing the pictures failed: {e}") from e
    finally:
        if "tqdm" in bar:
            bar["tqdm"].close()
    if stats.written:
        print(f"wrote {', '.join(str(p) for p in stats.written)} (+ .json sidecars) in {time.time() - start:.1f}s")
    if stats.reused:
        print(f"{stats.reused} picture(s) already in {args.out} with this request and these weights: kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
