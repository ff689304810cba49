"""The web app's cost over the sampler: a warm `/generate` request through gradio_client
against the same `DynamicIDPipeline.generate` + `save_outputs` call in-process (what
`launch/sample.py` does), and whether a second request at the same size recompiles.

  python benchmarks/app_overhead.py --repeats 5            # demo model, 64x64, 256x256, 512x512
  python benchmarks/app_overhead.py --sizes 64,512 --steps 30

Both sides run the same request (two people, two boxes, one free-text face edit) on the
same pipeline object; the app side includes the upload of both photos, the queue, the
request building and the download of PNG + sidecar. It is timed with two clients: the
README's (`ssl_verify=ssl.create_default_context()`: one TLS context for all requests) and
gradio_client's default (a new TLS context, ~25 ms of CPU, for every upload, download and
result stream). "gradio floor" is the same call (same inputs, the same uploads, outputs of
the same kinds and files) to an endpoint that does no work and returns a finished run's
files: what gradio and its client cost by themselves. `app_floor_breakdown.py` splits that
floor into its phases. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import ssl
import statistics
import sys
import tempfile
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

BOXES = ("0,0,1,0.5", "0,0.5,1,1")
FACE_PROMPT = "in a surprise expression, in front view"
CLIENTS = ("README client", "default client")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEST_ASSETS", str(_ROOT / "test_assets")))
    p.add_argument("--sizes", default="64,256,512", help="square sizes; the first is the warmed-up default")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    from gradio_client import Client, handle_file

    from dynamicid_jax import denoising
    from dynamicid_jax.app.service import create_service
    from dynamicid_jax.app.ui import build_demo, launch
    from dynamicid_jax.distributed import free_local_port
    from dynamicid_jax.outputs import save_outputs
    from dynamicid_jax.request import IdentityRequest, SampleRequest

    load = [os.getloadavg()[0]]
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
    url = f"http://127.0.0.1:{port}/"
    clients = dict(zip(CLIENTS, (Client(url, verbose=False, ssl_verify=ssl.create_default_context()),
                                 Client(url, verbose=False))))
    floor_client, floor_demo, finished = _floor_app(service.out_dir)
    floor_clients = dict(zip(CLIENTS, (floor_client, Client(floor_client.src, verbose=False))))
    floor_client.ssl_verify = ssl.create_default_context()
    cache = denoising.compiled_programs
    run_seconds = []  # service.run inside the app (request checks, generate, PNG + sidecar)
    service_run = service.run

    def timed_run(*a, **k):
        start = time.perf_counter()
        try:
            return service_run(*a, **k)
        finally:
            run_seconds.append(time.perf_counter() - start)

    service.run = timed_run

    rows = []
    for size in sizes:
        def in_process():
            request = SampleRequest(
                identities=[IdentityRequest(refs=[refs[0]], box=[0, 0, 1, 0.5]),
                            IdentityRequest(refs=[refs[1]], box=[0, 0.5, 1, 1], face_prompt=FACE_PROMPT)],
                prompt="two people", negative_prompt=service.defaults.negative_prompt, seed=0, steps=args.steps,
                guidance=service.defaults.guidance, height=size, width=size, alpha=service.defaults.alpha,
                beta=service.defaults.beta, id_scale=service.defaults.id_scale)
            # per-step progress as launch/sample.py's bar: the program the app runs (compiled at start-up)
            images, details = service.pipeline.generate(request, progress=lambda total: lambda: None)
            save_outputs(out / "direct", images, request, details, service.pipeline.provenance)

        def via_app(client):
            client.predict(refs_1=[handle_file(refs[0])], refs_2=[handle_file(refs[1])], box_1=BOXES[0],
                           box_2=BOXES[1], face_text_2=FACE_PROMPT, prompt="two people", seed=0,
                           steps=args.steps, width=size, height=size, api_name="/generate")
            finished[:] = sorted(service.out_dir.glob("run-*"))[-1:]  # what the floor endpoint returns

        def floor(client):
            client.predict([handle_file(refs[0])], [handle_file(refs[1])], BOXES[0], BOXES[1], FACE_PROMPT,
                           "two people", 0, args.steps, size, size, api_name="/generate")

        before = cache()
        start = time.perf_counter()
        via_app(clients[CLIENTS[0]])  # first request at this size (compiles unless warmed up)
        first = time.perf_counter() - start
        after_first = cache()
        via_app(clients[CLIENTS[0]])
        after_second = cache()
        calls = [("in-process", in_process)]
        for name in CLIENTS:
            calls += [(f"app, {name}", lambda c=clients[name]: via_app(c)),
                      (f"floor, {name}", lambda c=floor_clients[name]: floor(c))]
        times = {name: [] for name, _ in calls}
        runs = {name: [] for name in CLIENTS}
        for _ in range(args.repeats):  # interleaved, so load changes hit all alike
            for name, fn in calls:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
                if name.startswith("app, "):
                    runs[name[len("app, "):]].append(run_seconds[-1])
        med = {name: statistics.median(t) for name, t in times.items()}
        med.update({f"run, {c}": statistics.median(r) for c, r in runs.items()})
        rows.append((size, first, after_first - before, after_second - after_first, med))
        load.append(os.getloadavg()[0])
    demo.close()
    floor_demo.close()

    print(f"steps {args.steps}, median of {args.repeats}, two people with boxes and one face edit, demo model; "
          f"1-minute load average {', '.join(f'{v:.1f}' for v in load)} (start, after each size)\n")
    readme, default = (f"app, {c}" for c in CLIENTS)
    print("| size | first app request (s) | compiles: first / second request | in-process generate (s) "
          "| app request, README client (s) | app / in-process | app request, default client (s) "
          "| app / in-process | run inside the app, README / default client (s) "
          "| gradio floor, README / default client (s) | app - floor - run, README client (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, first, c1, c2, m in rows:
        direct, floor_r, floor_d = m["in-process"], m[f"floor, {CLIENTS[0]}"], m[f"floor, {CLIENTS[1]}"]
        run_r, run_d = m[f"run, {CLIENTS[0]}"], m[f"run, {CLIENTS[1]}"]
        print(f"| {size}x{size} | {first:.2f} | {c1} / {c2} | {direct:.3f} | {m[readme]:.3f} "
              f"| {m[readme] / direct:.2f}x | {m[default]:.3f} | {m[default] / direct:.2f}x "
              f"| {run_r:.3f} / {run_d:.3f} | {floor_r:.3f} / {floor_d:.3f} | {m[readme] - floor_r - run_r:+.3f} |")
    print("\ncompile log:")
    for line in logs:
        if "compil" in line:
            print(f"- {line}")


def _floor_app(out_dir):
    """A gradio app with /generate's inputs and outputs, served as the app is (`ui.launch`),
    that returns the files of the run named in the returned list `finished` (set by the
    caller): gradio's own cost, no work."""
    import types

    import gradio as gr
    from gradio_client import Client

    from dynamicid_jax.app.ui import launch
    from dynamicid_jax.distributed import free_local_port

    finished: list = []

    def generate(*_):
        run = finished[0]
        return [str(p) for p in sorted(run.glob("*.png")) + sorted(run.glob("*.json"))], [], "done"

    with gr.Blocks() as demo:
        inputs = [gr.File(file_count="multiple"), gr.File(file_count="multiple"), gr.Textbox(), gr.Textbox(),
                  gr.Textbox(), gr.Textbox(), gr.Number(), gr.Number(), gr.Number(), gr.Number()]
        outputs = [gr.File(file_count="multiple"), gr.Gallery(), gr.Textbox()]
        gr.Button().click(generate, inputs, outputs, api_name="generate", concurrency_limit=1)
    port = free_local_port()
    launch(demo, types.SimpleNamespace(out_dir=out_dir), port=port, block=False)
    return Client(f"http://127.0.0.1:{port}/", verbose=False), demo, finished


if __name__ == "__main__":
    main()
