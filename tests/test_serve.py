"""The local web page and JSON API (``serve --model BUNDLE``) on the smoke study's ensemble bundle.

The API is tested in process (FastAPI's TestClient) and through a real
uvicorn server started by the command line; the page in a real browser
(Debian's Chromium driven by Playwright), checking that no request leaves
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def client(bundles):
    from fastapi.testclient import TestClient

    from skin_lesion.serve import create_app

    return TestClient(create_app(bundles["smoke_ensemble"], max_bytes=300_000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(bundles):
    """``python -m skin_lesion serve`` on a free port, as a user starts it; yields its base URL."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skin_lesion", "serve", "--model", str(bundles["smoke_ensemble"]), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_health_names_the_loaded_model(client, bundles):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["model"]["kind"] == "mean_ensemble" and body["model"]["guard"] is True
    assert len(body["model"]["members"]) == 4 and "not a diagnosis" in body["note"]  # the study ensemble: two Lite0 sizes, the average, the CNN


def test_api_returns_the_fields_of_predict_json(client, bundles, demo_images):
    image = demo_images[0]
    res = client.post("/api/predict", files={"image": (image.name, image.read_bytes(), "image/jpeg")})
    assert res.status_code == 200, res.text
    api = res.json()
    cli_res = cli("predict", "--model", str(bundles["smoke_ensemble"]), "--json", str(image))
    expected = json.loads(cli_res.stdout)["predictions"][0]
    assert api["heatmap"].startswith("data:image/png;base64,") and len(api["heatmap"]) > 1000
    assert set(expected) - {"image"} <= set(api)
    for key in set(expected) - {"image", "heatmap"}:
        assert api[key] == expected[key], key
    assert api["image"] == image.name and "not a diagnosis" in api["note"]


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _bad_uploads(image: Path) -> dict:
    jpeg = image.read_bytes()
    return {
        "empty": ({"image": ("empty.jpg", b"", "image/jpeg")}, 400, "empty"),
        "not_an_image": ({"image": ("notes.txt", b"these are my notes, not a picture\n" * 20, "text/plain")}, 400, "not a readable image"),
        "truncated_jpeg": ({"image": ("cut.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}, 400, "not a readable image"),
        "corrupt_jpeg": ({"image": ("corrupt.jpg", jpeg[:20] + os.urandom(3000), "image/jpeg")}, 400, "not a readable image"),
        "over_the_size_limit": ({"image": ("big.jpg", jpeg + os.urandom(310_000), "image/jpeg")}, 413, "over the upload limit"),
        "decompression_bomb": ({"image": ("bomb.png", _png_with_size(20_000, 20_000), "image/png")}, 413, "too large an image"),
        "wrong_field_name": ({"file": (image.name, jpeg, "image/jpeg")}, 400, "no file in the field 'image'"),
    }


@pytest.mark.parametrize("case", list(_bad_uploads(Path(__file__))))
def test_bad_uploads_get_a_4xx_json_error_and_the_server_keeps_serving(client, demo_images, case):
    files, status, says = _bad_uploads(demo_images[0])[case]
    res = client.post("/api/predict", files=files)
    assert res.status_code == status, res.text
    assert says in res.json()["error"], res.json()
    good = client.post("/api/predict", files={"image": ("ok.jpg", demo_images[1].read_bytes(), "image/jpeg")})
    assert good.status_code == 200 and good.json()["top3"]


def test_a_picture_that_is_not_dermatoscopic_is_refused_unless_asked(client, tmp_path):
    from skin_lesion.guard import NOT_RECOGNISED, foreign_images

    cat = foreign_images(tmp_path)["chelsea"].read_bytes()
    body = client.post("/api/predict", files={"image": ("cat.png", cat, "image/png")}).json()
    assert body["recognised"] is False and body["message"] == NOT_RECOGNISED and "top3" not in body
    body = client.post("/api/predict?show_anyway=true", files={"image": ("cat.png", cat, "image/png")}).json()
    assert body["recognised"] is False and len(body["top3"]) == 3


def test_eight_concurrent_requests_are_all_answered_correctly(server, bundles, demo_images):
    import httpx

    from skin_lesion.bundle import Bundle

    images = demo_images[:8]
    bundle = Bundle(bundles["smoke_ensemble"])
    expected = [bundle.analyse_file(p).record(p.name) for p in images]

    def post(path: Path) -> dict:
        res = httpx.post(server + "/api/predict", files={"image": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60)
        assert res.status_code == 200, res.text
        return res.json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, images))
    for got, want in zip(answers, expected):
        assert got["image"] == want["image"] and got["label"] == want["label"] and got["top3"] == want["top3"]


def test_serving_beyond_this_machine_warns(bundles):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "skin_lesion", "serve", "--model", str(bundles["smoke_ensemble"]), "--host", "0.0.0.0", "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert first.startswith("warning: serving on 0.0.0.0") and "network" in first


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium; .ci/run installs it)")
def test_page_in_a_real_browser_shows_top3_and_heatmap_and_stays_local(server, demo_images, tmp_path):
    pytest.importorskip("playwright", reason="playwright not installed (make setup installs it)")
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda r: requests.append(r.url))
        page.goto(server + "/")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
        page.set_input_files("#file", str(demo_images[0]))
        page.wait_for_selector("#top3 li:nth-child(3)", timeout=30_000)
        page.wait_for_function("document.getElementById('heatmap').complete && document.getElementById('heatmap').naturalWidth > 0")
        top3 = page.locator("#top3 li").all_inner_texts()
        label = page.inner_text("#label")
        wide = page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    shots = os.environ.get("SKIN_LESION_SCREENSHOTS")
    if shots:  # keep the screenshot to look at
        shutil.copy(tmp_path / "page.png", Path(shots) / "serve_page.png")
    assert len(top3) == 3 and all("%" in t for t in top3) and label.startswith("Decided: ")
    assert wide, "the page scrolls sideways at 1200 px"
    outside = [u for u in requests if not u.startswith((server + "/", "data:", "blob:"))]
    assert not outside, outside
