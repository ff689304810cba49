"""The DynamicID web app: people, boxes, face edits and settings in a page (gradio).

  python launch/app.py --demo --expression_model fer_emotion_model.hdf5   # tiny random model
  python launch/app.py --base_model sd15/ --vision_encoder image_encoder/ \
      --dynamicid dynamicid_release/ --faces buffalo_l/ [--dtype bfloat16] [--port 7860] \
      [--lora_dir styles/] [--embedding_dir embeddings/]

The model flags are launch/sample.py's: --lora files are merged for every request,
--scheduler and --clip_skip set the page's defaults, --negative_embedding files are offered and
chosen by default. --lora_dir and --embedding_dir name folders whose files the page offers by
name (a client never names a server path); a picked LoRA set is merged once and kept.

Models load once; the default size and the identity programs (photos of any size, face
edits) are compiled at start-up (logged), so a first click does not wait for XLA. Binds
127.0.0.1 unless --host says otherwise; no public link unless --share. Outputs (PNG + JSON
sidecar per image) go under --out; uploaded photos stay in gradio's cache for at most
--keep_files_minutes (60) and are deleted when the server stops. The HTTP API (gradio_client,
endpoint /generate) is described in the README. Bad start-up input exits 2 with one line.

A base model alone (no --dynamicid, e.g. an SDXL folder) serves plain text-to-image: the page
hides the people and says so, and the warm-up compiles no identity program. On an SDXL model
(`--demo sdxl`, a DynamicID-SDXL run or its export as --dynamicid) the page also offers SDXL's
micro-conditioning (original size, crop corner, target size).
"""

from __future__ import annotations

import argparse
import sys



def parse_args(argv=None) -> argparse.Namespace:
    from dynamicid_jax import cli

    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])  # one-line flag errors, --verbose
    cli.add_model_args(p)
    p.add_argument("--lora_dir", action="append", default=[],
                   help="folder of style LoRA files the page offers by name, repeatable")
    p.add_argument("--embedding_dir", action="append", default=[],
                   help="folder of negative-embedding (textual-inversion) files the page offers by name, repeatable")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    p.add_argument("--out", default="app_outputs", help="folder the app writes pictures and sidecars to")
    p.add_argument("--warmup_people", default="1,2", help="people counts compiled at start-up ('' = none)")
    p.add_argument("--keep_files_minutes", type=float, default=None,
                   help="minutes gradio's cache keeps uploaded photos and served copies (default "
                        "dynamicid_jax.app.ui.KEEP_FILES_MINUTES, 60); all are deleted when the server stops")
    return p.parse_args(argv)


def _page_settings(args: argparse.Namespace) -> dict:
    """--scheduler/--clip_skip as the page's defaults, checked with the config's others before
    any model loads (a typo must not cost a model load)."""
    from dynamicid_jax.loading import identity_branch, sampling_config
    from dynamicid_jax.request import IdentityRequest, SampleRequest, validate_request
    from dynamicid_jax.request_parsing import setting_defaults

    settings = {k: v for k, v in (("scheduler", args.scheduler), ("clip_skip", args.clip_skip)) if v is not None}
    config = sampling_config(args.demo, args.dynamicid, args.base_model, args.vae)
    page = dict(setting_defaults(config.sampling), **settings)
    with_identity = identity_branch(args.demo, args.dynamicid)  # a base model alone: plain text-to-image
    validate_request(SampleRequest(identities=[IdentityRequest(refs=["(page)"])] if with_identity else [], **page),
                     2 ** (len(config.model.vae.block_out_channels) - 1), identity_branch=with_identity)
    return settings


def _start(args: argparse.Namespace):
    """Load the models and compile the warm-up sizes -> (service, notice); bad input: UserError."""
    from dynamicid_jax.app.service import create_service
    from dynamicid_jax import cli
    from dynamicid_jax.request import InputError

    if args.keep_files_minutes is not None and not 0 < args.keep_files_minutes < float("inf"):  # NaN too
        raise InputError(f"--keep_files_minutes {args.keep_files_minutes:g}: must be a positive number of minutes")
    cli.check_output_folder(args.out, "--out")  # before any model loads

    try:
        people = [int(v) for v in args.warmup_people.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--warmup_people {args.warmup_people!r}: comma-separated people counts, e.g. 1,2")
    service, notice = create_service(
        **cli.pipeline_args(args), out_dir=args.out, log=lambda m: print(m, flush=True),
        lora_dirs=args.lora_dir, embedding_dirs=args.embedding_dir,
        negative_embeddings=args.negative_embedding, settings=_page_settings(args),
    )
    service.warm_up(people)
    return service, notice


def _own_gradio_cache() -> None:
    """gradio's cache folder for this server alone (mode 0700, removed at exit), unless
    GRADIO_TEMP_DIR names one: servers sharing /tmp/gradio share uploads by content hash, so
    one server deleting its old or all its files (--keep_files_minutes, stop) would delete a
    photo another server is using. Set before gradio reads it (the page, the server, the
    service's upload folder)."""
    import atexit
    import os
    import shutil
    import tempfile

    if not os.environ.get("GRADIO_TEMP_DIR"):
        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="dynamicid-app-")
        atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)


def main(argv=None) -> int:
    from dynamicid_jax import cli
    from dynamicid_jax.errors import UserError

    args = parse_args(argv)
    cli.quiet_logs(args.verbose)
    _own_gradio_cache()
    try:  # start-up input only: once serving, the page reports a request's bad input itself
        service, notice = _start(args)
    except UserError as e:
        return cli.report_user_error(e)
    from dynamicid_jax.app.ui import build_demo, launch

    print(f"serving on http://{args.host}:{args.port} (outputs in {service.out_dir})", flush=True)
    keep = {} if args.keep_files_minutes is None else {"keep_files_s": args.keep_files_minutes * 60}
    launch(build_demo(service, notice), service, host=args.host, port=args.port, share=args.share, **keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
