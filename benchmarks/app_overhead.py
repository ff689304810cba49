"""The web app's cost over the sampler: a warm `/generate` request through gradio_client
against the same `DynamicIDPipeline.generate` + `save_outputs` call in-process (what
`launch/sample.py` does), and whether a second request at the same size recompiles.

  python benchmarks/app_overhead.py --repeats 5            # demo model, 64x64 and 256x256
  python benchmarks/app_overhead.py --sizes 512 --steps 30  # a bigger picture

Both sides run the same request (two people, two boxes, one free-text face edit) on the
same pipeline object; the app side includes the upload of both photos, the queue, the
request building and the download of PNG + sidecar. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

BOXES = ("0,0,1,0.5", "0,0.5,1,1")
FACE_PROMPT = "in a surprise expression, in front view"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEST_ASSETS", str(_ROOT / "test_assets")))
    p.add_argument("--sizes", default="64,256", help="square sizes; the first is the warmed-up default")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from gradio_client import Client, handle_file

    from dynamicid_jax import denoising
    from dynamicid_jax.app.service import create_service
    from dynamicid_jax.app.ui import build_demo, launch
    from dynamicid_jax.distributed import free_local_port
    from dynamicid_jax.sampling import IdentityRequest, SampleRequest, save_outputs

    assets = pathlib.Path(args.assets)
    refs = [str(assets / "obama.jpg"), str(assets / "0-f15-hao-ph.jpg")]
    logs = []
    out = pathlib.Path(tempfile.mkdtemp(prefix="app_bench_"))
    service, notice = create_service(demo=True, out_dir=out / "app", log=logs.append,
                                     expression_model=str(assets / "fer_emotion_model.hdf5"))
    sizes = [int(s) for s in args.sizes.split(",")]
    service.defaults.height = service.defaults.width = sizes[0]
    service.warm_up([2])
    demo = build_demo(service, notice)
    port = free_local_port()
    launch(demo, service, port=port, block=False)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    cache = denoising.compiled_programs

    rows = []
    for size in sizes:
        def in_process():
            request = SampleRequest(
                identities=[IdentityRequest(refs=[refs[0]], box=[0, 0, 1, 0.5]),
                            IdentityRequest(refs=[refs[1]], box=[0, 0.5, 1, 1], face_prompt=FACE_PROMPT)],
                prompt="two people", negative_prompt=service.defaults.negative_prompt, seed=0, steps=args.steps,
                guidance=service.defaults.guidance, height=size, width=size, alpha=service.defaults.alpha,
                beta=service.defaults.beta, id_scale=service.defaults.id_scale)
            images, details = service.pipeline.generate(request)
            save_outputs(out / "direct", images, request, details, service.pipeline.provenance)

        def via_app():
            client.predict(refs_1=[handle_file(refs[0])], refs_2=[handle_file(refs[1])], box_1=BOXES[0],
                           box_2=BOXES[1], face_text_2=FACE_PROMPT, prompt="two people", seed=0, steps=args.steps,
                           width=size, height=size, api_name="/generate")

        before = cache()
        start = time.perf_counter()
        via_app()  # first request at this size (compiles unless warmed up)
        first = time.perf_counter() - start
        after_first = cache()
        via_app()
        after_second = cache()
        times = {"in-process": [], "app": []}
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            for name, fn in (("in-process", in_process), ("app", via_app)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        direct, app = statistics.median(times["in-process"]), statistics.median(times["app"])
        rows.append((size, first, after_first - before, after_second - after_first, direct, app))
    demo.close()

    print(f"steps {args.steps}, median of {args.repeats}, two people with boxes and one face edit, demo model\n")
    print("| size | first app request (s) | compiles: first / second request | in-process generate (s) "
          "| app request (s) | app / in-process |")
    print("|---|---|---|---|---|---|")
    for size, first, c1, c2, direct, app in rows:
        print(f"| {size}x{size} | {first:.2f} | {c1} / {c2} | {direct:.3f} | {app:.3f} | {app / direct:.2f}x |")
    print("\ncompile log:")
    for line in logs:
        if "compil" in line:
            print(f"- {line}")


if __name__ == "__main__":
    main()
