"""Where gradio's floor goes: one `gradio_client` call to a do-nothing `/generate` with the
app's inputs and outputs (`app_overhead._floor_app`, served by `ui.launch`), split into phases
by timestamps taken inside gradio and gradio_client (wrapped functions, nothing changed),
median over calls, for gradio_client's default client and the README's (one TLS context).

  python benchmarks/app_floor_breakdown.py --calls 20

No model, no JAX work: the endpoint returns a small PNG and its JSON sidecar written here.
Also times one request to a trivial route the ways gradio_client can make it: by default it
opens a new httpx client, hence a new TLS context with the CA bundle loaded, for each
upload, join, result stream and download. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict, deque

_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "benchmarks"))

NOW = time.perf_counter
CALL: dict = defaultdict(float)  # this call's timestamps ("t:") and summed durations


def _timed(label, fn):
    """Wrap a sync or async function: adds its duration to CALL[label]; CALL['t:label'] = its start."""
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*a, **k):
            start = NOW()
            CALL.setdefault(f"t:{label}", start)
            try:
                return await fn(*a, **k)
            finally:
                CALL[label] += NOW() - start
                CALL[f"t:{label} end"] = NOW()
    else:
        @functools.wraps(fn)
        def wrapper(*a, **k):
            start = NOW()
            CALL.setdefault(f"t:{label}", start)
            try:
                return fn(*a, **k)
            finally:
                CALL[label] += NOW() - start
                CALL[f"t:{label} end"] = NOW()
    return wrapper


class _ArrivalDeque(deque):
    """gradio_client's per-event message deque, noting when the completion message arrives."""

    def append(self, msg):
        if isinstance(msg, dict) and msg.get("msg") == "process_completed":
            CALL.setdefault("t:completed arrives", NOW())
        super().append(msg)


def _instrument():
    import gradio.blocks
    import gradio.queueing
    import gradio_client.client as gc
    import gradio_client.utils as gu
    from gradio.server_messages import ProcessCompletedMessage

    gc.Endpoint._upload_file = _timed("client: upload", gc.Endpoint._upload_file)
    gc.Endpoint._download_file = _timed("client: download", gc.Endpoint._download_file)
    gc.Client.send_data = _timed("client: join", gc.Client.send_data)
    gu.get_pred_from_sse_v1plus = _timed("client: wait", gu.get_pred_from_sse_v1plus)
    gc.deque = _ArrivalDeque
    q = gradio.queueing.Queue
    q.push = _timed("server: push", q.push)
    q.process_events = _timed("server: process_events", q.process_events)
    q.compute_analytics_summary = _timed("server: analytics summary", q.compute_analytics_summary)
    b = gradio.blocks.Blocks
    b.preprocess_data = _timed("server: preprocess", b.preprocess_data)
    b.call_function = _timed("server: fn call", b.call_function)
    b.postprocess_data = _timed("server: postprocess", b.postprocess_data)
    send = q.send_message

    def send_message(self, event, message):
        if isinstance(message, ProcessCompletedMessage):
            CALL.setdefault("t:completed sent", NOW())
        return send(self, event, message)

    q.send_message = send_message


def _phases(c) -> dict:
    """One call's timestamps -> phases (seconds) along the critical path."""
    t = lambda k: c[f"t:{k}"]  # noqa: E731
    return {
        "uploads (2 files, client POST /upload each)": c["client: upload"],
        "join (client POST /queue/join)": c["client: join"],
        "queue pick-up (join handled -> event starts)": t("server: process_events") - t("server: push end"),
        "event start -> preprocess": t("server: preprocess") - t("server: process_events"),
        "preprocess (2 uploads to File paths)": c["server: preprocess"],
        "handler (anyio thread hop, fn returns at once)": c["server: fn call"],
        "postprocess (the reply's files)": c["server: postprocess"],
        "postprocess -> completion message": t("completed sent") - t("server: postprocess end"),
        "SSE delivery (message sent -> client has it)": t("completed arrives") - t("completed sent"),
        "client poll lag (has it -> wait returns)": t("client: wait end") - t("completed arrives"),
        "downloads (client GET per file)": c["client: download"],
    }


def _fake_run(folder: pathlib.Path) -> pathlib.Path:
    import numpy as np
    from PIL import Image

    run = folder / "run-00000-0"
    run.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(run / "x.png")
    (run / "x.json").write_text(json.dumps({"request": {"prompt": "two people"}}))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default=os.environ.get("TEST_ASSETS", str(_ROOT / "test_assets")))
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    import ssl

    import httpx
    from gradio_client import handle_file

    from app_overhead import BOXES, FACE_PROMPT, _floor_app

    _instrument()
    out = pathlib.Path(tempfile.mkdtemp(prefix="app_floor_"))
    client, demo, finished = _floor_app(out)
    finished[:] = [_fake_run(out)]
    refs = [str(pathlib.Path(args.assets) / n) for n in ("obama.jpg", "0-f15-hao-ph.jpg")]
    verify = {"default client": True, "README client": ssl.create_default_context()}
    columns = {}
    load = [os.getloadavg()[0]]
    for name, ssl_verify in verify.items():
        client.ssl_verify = ssl_verify
        rows = defaultdict(list)
        for k in range(args.calls + 1):
            CALL.clear()
            start = NOW()
            client.predict([handle_file(refs[0])], [handle_file(refs[1])], BOXES[0], BOXES[1], FACE_PROMPT,
                           "two people", 0, 8, 64, 64, api_name="/generate")
            total = NOW() - start
            time.sleep(0.05)  # the post-reply work (analytics summary) ends before the next call
            if k == 0:
                continue  # the first call of a client: connections, imports
            phases = _phases(CALL)
            for phase, v in phases.items():
                rows[phase].append(v)
            rows["other client work (threads, argument handling)"].append(total - sum(phases.values()))
            rows["**whole call**"].append(total)
            rows["(after the reply, off the path: gradio's analytics summary)"].append(
                CALL["server: analytics summary"])
        columns[name] = {k: statistics.median(v) for k, v in rows.items()}
        load.append(os.getloadavg()[0])
    print(f"median of {args.calls} calls per client; 1-minute load average {', '.join(f'{v:.1f}' for v in load)} "
          "(start, after each client)\n")
    print("| phase | " + " | ".join(f"{n} (ms)" for n in verify) + " |")
    print("|---|" + "---|" * len(verify))
    for phase in columns["default client"]:
        print(f"| {phase} | " + " | ".join(f"{columns[n][phase] * 1000:.1f}" for n in verify) + " |")

    # One HTTP request as gradio_client makes it (a new httpx client per request) and on a kept client.
    url = client.src_prefixed + "queue/status"
    kept = httpx.Client()
    ways = {
        "TLS context with the CA bundle (`httpx.create_ssl_context()`)": lambda: httpx.create_ssl_context(),
        "GET, new httpx client (gradio_client's default, ssl_verify=True)": lambda: httpx.get(url),
        "GET, new httpx client, one TLS context reused (README client)":
            lambda: httpx.get(url, verify=verify["README client"]),
        "GET on a kept-open httpx.Client": lambda: kept.get(url),
    }
    print("\n| one request to a trivial route | median (ms) |")
    print("|---|---|")
    for name, fn in ways.items():
        fn()
        times = []
        for _ in range(max(args.calls, 10)):
            start = NOW()
            fn()
            times.append(NOW() - start)
        print(f"| {name} | {statistics.median(times) * 1000:.1f} |")
    demo.close()


if __name__ == "__main__":
    main()
