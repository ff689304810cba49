"""The web app under concurrent load: requests per second and latency percentiles at 1, 4
and 8 simultaneous gradio_client clients (loopback, demo model by default).

  python benchmarks/app_load.py                       # demo model, 64x64, 8 steps, 1/4/8 clients
  python benchmarks/app_load.py --clients 1,8 --requests 10 --steps 30

Every client sends `--requests` requests one after another (two people with boxes, the
warmed-up shape, so nothing compiles while timing); the clients run in parallel threads, each
with its own gradio_client Client, as independent browsers would. The app serves one
generation at a time (the device is the bottleneck; the others wait in gradio's queue), so
throughput should stay flat with more clients while latency grows with the queue. Latency is
one request's wall time at its client: upload, queue wait, run, download. Prints a markdown
table (benchmarks/app_load_report.md keeps one run).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def percentile(values, q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEST_ASSETS", str(_ROOT / "test_assets")))
    p.add_argument("--clients", default="1,4,8", help="concurrent client counts, one table row each")
    p.add_argument("--requests", type=int, default=5, help="requests per client")
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    from gradio_client import Client, handle_file

    from dynamicid_jax.app.service import create_service
    from dynamicid_jax.app.ui import build_demo, launch
    from dynamicid_jax.distributed import free_local_port

    assets = pathlib.Path(args.assets)
    refs = [str(assets / "obama.jpg"), str(assets / "0-f15-hao-ph.jpg")]
    out = pathlib.Path(tempfile.mkdtemp(prefix="app_load_"))
    service, notice = create_service(demo=True, out_dir=out, log=lambda m: None,
                                     expression_model=str(assets / "fer_emotion_model.hdf5"))
    service.warm_up([2])
    demo = build_demo(service, notice)
    port = free_local_port()
    launch(demo, service, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"

    def one_client(n_requests: int, seed0: int) -> list[float]:
        client = Client(url, verbose=False, ssl_verify=ssl.create_default_context())
        seconds = []
        for k in range(n_requests):
            start = time.perf_counter()
            client.predict(refs_1=[handle_file(refs[0])], refs_2=[handle_file(refs[1])], box_1=BOXES[0],
                           box_2=BOXES[1], prompt="two people", seed=seed0 + k, steps=args.steps, alpha="1",
                           api_name="/generate")
            seconds.append(time.perf_counter() - start)
        return seconds

    one_client(2, 0)  # warm: the first requests load gradio's and the client's lazy parts
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            latencies = [s for ss in pool.map(lambda c: one_client(args.requests, 1000 * c), range(n)) for s in ss]
        wall = time.perf_counter() - start
        rows.append((n, len(latencies), len(latencies) / wall, statistics.median(latencies),
                     percentile(latencies, 0.95)))
    demo.close()
    print(f"demo model, 64x64, two people, {args.steps} steps, {args.requests} requests per client; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| clients | requests | requests/s | p50 latency (s) | p95 latency (s) |")
    print("|---:|---:|---:|---:|---:|")
    for n, count, rate, p50, p95 in rows:
        print(f"| {n} | {count} | {rate:.2f} | {p50:.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
