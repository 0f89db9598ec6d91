"""A local web page and JSON API on an exported bundle (``serve --model BUNDLE``).

FastAPI serves one page and two endpoints from this machine:

- ``GET /``: the page (``web/index.html``; inline styles and script, nothing
  loaded from elsewhere);
- ``POST /api/predict``: a multipart upload in the field ``image``; returns the
  fields of ``predict --json`` for that image, with the heatmap as a PNG data URL;
- ``GET /api/health``: which model is loaded.

Uploads are read into memory, scored, and dropped: nothing is written to a
named file. Requests are scored one at a time (the LiteRT interpreters are not
thread-safe), so concurrent requests queue rather than mix. Errors a user can
cause (no file, wrong field, empty, not an image, corrupt, too many bytes or
pixels) are a 4xx JSON ``{"error": message}`` and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile

from skin_lesion.bundle import Bundle
from skin_lesion.info import DISCLAIMER, ImageError
from skin_lesion.pixels import ImageTooLarge, decode_bytes, overlay_heatmap

FIELD = "image"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024  # a dermatoscopic photograph is a few MiB at most
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def png_data_url(rgb: np.ndarray) -> str:
    """An RGB array as a ``data:image/png;base64,...`` URL (the page shows it without a second request)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(bundle_folder: str | os.PathLike, max_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The FastAPI app serving the page and the API on the bundle in ``bundle_folder``."""
    bundle = Bundle(bundle_folder)
    lock = threading.Lock()
    page = resources.files("skin_lesion").joinpath("web/index.html").read_text(encoding="utf-8")
    # no /docs or /redoc: FastAPI's documentation pages load their scripts from a CDN
    app = FastAPI(title="skin_lesion", docs_url=None, redoc_url=None, openapi_url=None)

    def score(data: bytes, name: str, show_anyway: bool) -> dict:
        rgb = decode_bytes(data, name)
        with lock:
            analysis = bundle.analyse(rgb, heatmap=True)
        record = analysis.record(name, show_anyway=show_anyway)
        if "top3" in record:
            record["heatmap"] = png_data_url(overlay_heatmap(rgb, analysis.heatmap))
        return record

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict:
        return {"status": "ok", "model": bundle.describe(), "note": DISCLAIMER}

    @app.post("/api/predict")
    async def predict(request: Request, show_anyway: bool = False):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
            return _error(413, f"upload of {int(declared)} bytes is over the limit of {max_bytes} bytes; send a smaller image")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # Starlette's multipart parser raises its own error types for malformed bodies
            return _error(400, f"not a multipart upload ({type(e).__name__}); send the image as multipart/form-data in the field '{FIELD}'")
        upload = form.get(FIELD)
        if not isinstance(upload, UploadFile):
            got = ", ".join(repr(k) for k in form.keys()) or "none"
            return _error(400, f"no file in the field '{FIELD}' (fields sent: {got}); send the image as multipart/form-data field '{FIELD}'")
        data = await upload.read(max_bytes + 1)
        await form.close()
        name = Path(upload.filename or "upload").name
        if len(data) > max_bytes:
            return _error(413, f"{name}: over the upload limit of {max_bytes} bytes; send a smaller image")
        if not data:
            return _error(400, f"{name}: the file is empty; choose a JPEG or PNG image")
        try:
            record = await run_in_threadpool(score, data, name, show_anyway)
        except ImageTooLarge as e:
            return _error(413, str(e))
        except ImageError as e:
            return _error(400, str(e))
        return {**record, "note": DISCLAIMER}

    return app


def serve(bundle_folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted; warns when bound beyond this machine."""
    import sys

    import uvicorn

    app = create_app(bundle_folder)
    if host not in LOOPBACK:
        print(f"warning: serving on {host}: other machines on the network can send images to this model and read its answers; "
              "the page has no login and is meant for one person on their own machine", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"skin_lesion: serving {bundle_folder} at http://{shown}:{port}/ (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
