"""The web app under load and faults, on loopback with bounded loops: 8 concurrent
gradio_client clients x 5 requests, a client killed mid-run, an upload over the limit.

Its own demo app (test_app.py's fixture; the persistent compile cache makes its start-up
cheap after the first run); every request has the warmed-up shape (64x64, two people with
boxes) and 2 steps, so nothing compiles after start-up. Cost on 2 shared CPU cores, measured:
42 s at load average ~2 (start-up 20 s with a warm compile cache, 40 requests + 4 references
11 s, the killed client 3.5 s, the upload 1.3 s), 75 s at load average 5.
"""

from __future__ import annotations

import concurrent.futures
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("gradio", reason="the app extra (make install) provides gradio")

from processes import wait_for  # noqa: E402
from test_app import BOXES, app  # noqa: E402,F401  (the module-scoped demo app fixture)

CLIENTS, REQUESTS = 8, 5
SEEDS = (21, 22, 23, 24)  # request k of client c has seed SEEDS[(c + k) % 4]: each picture made 10 times


def _kwargs(test_assets, seed: int, steps: int = 2) -> dict:
    from gradio_client import handle_file

    return dict(refs_1=[handle_file(str(test_assets / "obama.jpg"))],
                refs_2=[handle_file(str(test_assets / "0-f15-hao-ph.jpg"))], box_1=BOXES[0], box_2=BOXES[1],
                seed=seed, steps=steps, alpha="1", prompt="two people", api_name="/generate")


def _client(url):
    import ssl

    from gradio_client import Client

    return Client(url, verbose=False, ssl_verify=ssl.create_default_context())


def _rss_bytes() -> int:
    """Resident memory of this process (the server runs in it): /proc/self/statm pages."""
    import os

    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reference_pngs(service, test_assets, tmp_path) -> dict[int, bytes]:
    """What launch/sample.py writes for each seed: its request building, the app's pipeline
    (the program start-up compiled), save_outputs."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from dynamicid_jax.outputs import save_outputs
    from launch import sample

    out = {}
    for seed in SEEDS:
        args = sample.parse_args(["--demo", "--ref", str(test_assets / "obama.jpg"), "--ref",
                                  str(test_assets / "0-f15-hao-ph.jpg"), "--box", BOXES[0], "--box", BOXES[1],
                                  "--prompt", "two people", "--seed", str(seed), "--steps", "2", "--alpha", "1"])
        request = sample.build_request(args, service.defaults)
        images, details = service.pipeline.generate(request, progress=lambda total: lambda: None)
        out[seed] = save_outputs(tmp_path / str(seed), images, request, details, service.pipeline.provenance)[0] \
            .read_bytes()
    return out


def test_eight_clients_five_requests_each_get_the_cli_bytes(app, test_assets, tmp_path):  # noqa: F811
    from gradio_client.utils import Status

    from dynamicid_jax.compile_count import compiles

    service, url, _, _, compiled = app
    want = _reference_pngs(service, test_assets, tmp_path)
    assert len(set(want.values())) == len(SEEDS)  # four different pictures
    ranks: list[int] = []
    rss: dict[str, int] = {}
    done = []

    def one_client(c: int) -> list[tuple[int, bytes]]:
        client, got = _client(url), []
        for k in range(REQUESTS):
            seed = SEEDS[(c + k) % len(SEEDS)]
            job = client.submit(**_kwargs(test_assets, seed))
            deadline = time.monotonic() + 300
            while not job.done() and time.monotonic() < deadline:  # the queue position as the page shows it
                status = job.status()
                if status.code == Status.IN_QUEUE and status.rank is not None:
                    ranks.append(status.rank)
                time.sleep(0.05)
            files = job.result(timeout=max(1.0, deadline - time.monotonic()))[0]
            got.append((seed, pathlib.Path(next(f for f in files if f.endswith(".png"))).read_bytes()))
            done.append(seed)
            if len(done) == CLIENTS:
                rss["first"] = _rss_bytes()
        return got

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for rs in pool.map(one_client, range(CLIENTS)) for r in rs]
    rss["last"] = _rss_bytes()
    assert len(results) == CLIENTS * REQUESTS
    assert all(png == want[seed] for seed, png in results)
    assert ranks and max(ranks) >= 1, "no queue position was reported"
    # Memory settles: 32 more requests after the first 8 grow the server by less than 10%.
    assert rss["last"] <= 1.1 * rss["first"], rss
    assert compiles() == compiled, f"{compiles() - compiled} program(s) compiled after start-up"


KILLED_CLIENT = textwrap.dedent("""
    import os, sys, time
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status
    url, obama, other, boxes = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(";")
    job = Client(url, verbose=False).submit(
        refs_1=[handle_file(obama)], refs_2=[handle_file(other)], box_1=boxes[0], box_2=boxes[1], seed=5,
        steps=60, alpha="1", prompt="two people", api_name="/generate")
    deadline = time.monotonic() + 120
    while job.status().code != Status.PROGRESS and time.monotonic() < deadline:
        time.sleep(0.02)
    print("running", flush=True)
    os._exit(0)  # the connection dies with the process, mid-run
""")


def test_a_client_killed_mid_run_blocks_nothing_and_leaves_no_partial_file(app, test_assets):  # noqa: F811
    service, url = app[0], app[1]
    before = set(service.out_dir.glob("run-*"))
    killed = subprocess.run([sys.executable, "-c", KILLED_CLIENT, url, str(test_assets / "obama.jpg"),
                             str(test_assets / "0-f15-hao-ph.jpg"), ";".join(BOXES)],
                            capture_output=True, text=True, timeout=180)
    assert killed.stdout.strip() == "running", killed.stderr[-2000:]
    start = time.monotonic()
    files = _client(url).predict(**_kwargs(test_assets, 31))[0]  # queued behind the orphaned run, then served
    assert any(f.endswith(".png") for f in files) and time.monotonic() - start < 120
    for run in set(service.out_dir.glob("run-*")) - before:  # the orphaned run and this one: whole or absent
        names = sorted(p.name for p in run.iterdir())
        assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")], names
        pngs = [n for n in names if n.endswith(".png")]
        assert all(n[:-4] + ".json" in names for n in pngs), names


def test_an_upload_over_the_limit_is_refused_while_it_streams(app, test_assets):  # noqa: F811
    """A 1 GiB upload (from a generator: nothing that large exists) is answered 413 by
    gradio's streaming parser once the part passes the limit: what the server keeps of it,
    in memory or on disk, stays far below the upload (the rest is drained and dropped)."""
    import httpx

    from dynamicid_jax.app import forms

    service, url = app[0], app[1]
    chunk = b"\0" * 2**20

    def body():
        yield (b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(1024):
            yield chunk
        yield b"\r\n--x--\r\n"

    rss = _rss_bytes()
    response = httpx.post(f"{url}gradio_api/upload", content=body(), timeout=120,
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "maximum allowed size" in response.text, response.text[:200]
    assert _rss_bytes() - rss < 256 * 2**20  # never held whole (1 GiB)
    kept = [p for p in pathlib.Path(service.upload_root).rglob("*") if p.is_file()]
    assert all(p.stat().st_size <= forms.MAX_UPLOAD_BYTES for p in kept)
    files = _client(url).predict(**_kwargs(test_assets, 32))[0]  # and it keeps serving
    assert any(f.endswith(".png") for f in files)


@pytest.mark.parametrize("keep_s, gone_when", [(3600, "the server stops"), (2, "they are older than 2 s")])
def test_uploaded_faces_leave_gradios_cache(app, test_assets, tmp_path, monkeypatch, keep_s, gone_when):  # noqa: F811
    """The reference photos clients upload (people's faces) do not pile up in gradio's cache:
    `ui.launch` deletes them after `keep_files_s` and all of them when the server stops
    (gradio alone keeps them for good). A server of its own on the module's service, with its
    cache in tmp_path. Deleting after 2 s takes one check period (2 s) past the age, so 30 s
    is a wide bound; a server without the setting keeps them (the breakage this catches)."""
    from gradio_client import Client

    from dynamicid_jax.app.ui import build_demo, launch
    from dynamicid_jax.distributed import free_local_port

    service = app[0]
    cache = (tmp_path / "gradio_cache").resolve()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))  # read when the page and the server are built
    monkeypatch.setattr(service, "upload_root", cache)
    demo, port = build_demo(service), free_local_port()
    launch(demo, service, port=port, block=False, keep_files_s=keep_s)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "downloads"))
        files = client.predict(**_kwargs(test_assets, 33))[0]
        assert any(f.endswith(".png") for f in files)
        uploads = list(cache.rglob("*.jpg"))
        assert sorted(p.name for p in uploads) == ["0-f15-hao-ph.jpg", "obama.jpg"], uploads
        if keep_s > 60:
            assert all(p.exists() for p in uploads)
            demo.close()
        assert wait_for(lambda: not any(p.exists() for p in uploads), 30), f"uploads kept after {gone_when}"
    finally:
        demo.close()


def test_each_app_server_has_a_cache_folder_of_its_own(monkeypatch):
    """launch/app.py gives its server a private gradio cache (0700, removed at exit) unless
    GRADIO_TEMP_DIR names one: the deletions above must not reach another server's files."""
    import os
    import tempfile

    from launch import app as app_cli

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    app_cli._own_gradio_cache()
    folder = pathlib.Path(os.environ["GRADIO_TEMP_DIR"])
    try:
        assert folder.is_dir() and folder.parent == pathlib.Path(tempfile.gettempdir())
        assert folder.stat().st_mode & 0o777 == 0o700
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder / "chosen"))
        app_cli._own_gradio_cache()
        assert os.environ["GRADIO_TEMP_DIR"] == str(folder / "chosen")  # the operator's choice stays
    finally:
        folder.rmdir()
