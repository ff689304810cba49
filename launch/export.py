"""Export a DynamicID training run (SD1.5 or SDXL) as one weights file in the release's key layout.

  python launch/export.py --dynamicid runs/sdxl_reconfig --out dynamicid_sdxl.safetensors
  python launch/sample.py --dynamicid dynamicid_sdxl.safetensors --base_model sdxl/ \
      --vision_encoder image_encoder/ --ref alice.jpg --prompt "..."

--dynamicid: a `launch/train.py` workdir (its newest checkpoint), its checkpoints/ folder or
one step folder. The file holds the run's own parameters (face projection, every attention
processor's LoRA and identity projections, and IMR + keypoint encoder for a stage-2 run)
under the release's keys, and the run's config with its base model resolved; the base
model's weights stay with the base model (dynamicid_jax/dynamicid/weights_file.py).
Bad input exits with status 2 and one line on stderr naming it.
"""

from __future__ import annotations

import sys


def parse_args(argv=None):
    from dynamicid_jax.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dynamicid", required=True, help="training workdir (or its checkpoints/ or a step folder)")
    p.add_argument("--out", required=True, help="the weights file to write (.safetensors)")
    return p.parse_args(argv)


def export_run(dynamicid: str, out: str):
    """Write `out` from the run at `dynamicid`; returns its path."""
    import ml_collections

    from dynamicid_jax import modeling
    from dynamicid_jax.dynamicid import weights_file
    from dynamicid_jax.errors import ConfigError
    from dynamicid_jax.loading import run_base, training_run_config
    from dynamicid_jax.training.checkpoints import load_trained_params

    run = None if weights_file.is_weights_file(dynamicid) else training_run_config(dynamicid)
    if run is None:
        raise ConfigError(f"--dynamicid {dynamicid}: not a training workdir (export reads a launch/train.py run)")
    config = ml_collections.ConfigDict(run.to_dict())
    random, base_model = run_base(run)  # a stage-2 run's base is its stage-1 run's: resolved now
    config.init.random, config.init.base_model, config.init.stage1 = random, base_model, ""
    modules = modeling.build_modules(run.model)
    return weights_file.write(out, load_trained_params(dynamicid, modules), modules, config)


def main(argv=None) -> int:
    from dynamicid_jax import cli

    args = parse_args(argv)
    cli.quiet_logs(args.verbose)
    return cli.run_main(_run, args)


def _run(args) -> int:
    path = export_run(args.dynamicid, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
