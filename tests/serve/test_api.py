"""The HTTP API: equal to ``shpeft predict``, every bad input a clear 4xx, access control."""

from __future__ import annotations

import base64
import csv
import io
import json
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import starlette.formparsers
import torch
from fastapi.testclient import TestClient
from PIL import Image

from shpeft.cli import main
from shpeft.data import ImageFileDataset
from shpeft.runs import load_run
from shpeft.serve.app import ServeSettings, create_app
from shpeft.serve.registry import RunRef, load_registry
from tests.serve.conftest import png_bytes

LIMITS = {"max_upload_bytes": 2 * 2**20, "max_pixels": 4_000_000}
KEY = "k" * 24


def make_client(runs: dict[str, Path], **settings) -> TestClient:
    registry = load_registry([RunRef(n, p) for n, p in runs.items()])
    return TestClient(
        create_app(registry, ServeSettings(**(LIMITS | settings))), base_url="http://127.0.0.1"
    )


@pytest.fixture(scope="module")
def client(runs):
    with make_client(runs) as c:
        yield c


def reference_logits(run: Path, path: Path) -> torch.Tensor:
    """``shpeft predict``'s computation for one file: load_run + ImageFileDataset."""
    model, _, spec, _ = load_run(run)
    ds = ImageFileDataset(
        [path], image_size=spec.image_size, mean=spec.mean, std=spec.std,
        interpolation=spec.interpolation,
    )  # fmt: skip
    with torch.no_grad():
        return model(ds[0][0][None])[0]


def post(client: TestClient, url: str, path: Path, **kw):
    return client.post(url, files={"file": (path.name, path.read_bytes())}, **kw)


def test_health_and_tasks(client, runs):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["tasks"] == len(runs) and health["refused"] == 0
    assert [b["tasks"] for b in health["bases"]] == [list(runs)]
    body = client.get("/tasks").json()
    assert [t["name"] for t in body["tasks"]] == list(runs) and body["refused"] == []
    for info in body["tasks"]:
        run = runs[info["name"]]
        model, classes, _, conf = load_run(run)
        assert info["classes"] == classes and info["method"] == conf["train"]["method"]
        assert info["delta_bytes"] == (run / "delta.safetensors").stat().st_size
        metrics = json.loads((run / "metrics.json").read_text())
        assert info["trainable_pct"] == metrics["trainable"]["backbone_trainable_pct"]
        assert info["test"] == {k: metrics["test"][k] for k in ("macro_f1", "accuracy", "auc", "n")}


def test_every_format_every_task_equals_shpeft_predict(client, runs, images, tmp_path):
    folder = images["benign.png"].parent
    for name, run in runs.items():
        out = tmp_path / f"{name}.csv"
        assert main(["-q", "predict", "--run", str(run), "--images", str(folder), "-o", str(out),
                     "--device", "cpu"]) == 0  # fmt: skip
        rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
        assert set(rows) == set(images)
        for fname, path in images.items():
            body = post(client, f"/predict/{name}", path).json()
            classes = body["classes"]
            assert body["task"] == name and body["prediction"] == rows[fname]["prediction"]
            cli = [float(rows[fname][f"prob_{c}"]) for c in classes]
            np.testing.assert_allclose(body["probabilities"], cli, atol=1e-6, rtol=0)  # 6 decimals
            torch.testing.assert_close(
                torch.tensor(body["logits"]), reference_logits(run, path), atol=1e-5, rtol=0
            )


def test_one_call_runs_every_task(client, runs, images):
    path = images["malignant.png"]
    together = post(client, "/predict", path).json()["predictions"]
    assert [p["task"] for p in together] == list(runs)
    for p in together:
        alone = post(client, f"/predict/{p['task']}", path).json()
        assert p["prediction"] == alone["prediction"]
        np.testing.assert_allclose(p["logits"], alone["logits"], atol=1e-5, rtol=0)


def test_heat_map_of_the_predicted_class(client, images):
    body = post(client, "/predict/busi?heatmap=true", images["benign.png"]).json()
    head, _, data = body["heatmap"].partition(",")
    assert head == "data:image/png;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.format == "PNG" and picture.size == (224, 224) and picture.mode == "RGB"
    assert "heatmap" not in post(client, "/predict/busi", images["benign.png"]).json()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    data = bytearray(png_bytes(np.zeros((1, 1), np.uint8)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def multipart(name: str, filename: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "shpeftboundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"'
        f"\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode() + payload
    return body, f"multipart/form-data; boundary={boundary}"


def bad_requests(images: dict[str, Path]) -> dict[str, tuple[dict, int, str]]:
    """name: (request, status, message) for every kind of bad input."""
    png = images["benign.png"].read_bytes()
    cut_body, cut_type = multipart("file", "a.png", png)  # no closing boundary
    up = "/predict/busi"
    dicom = bytearray(images["benign.dcm"].read_bytes())
    return {
        "not an image": (
            {"url": up, "files": {"file": ("notes.txt", b"these are not pixels")}},
            415, "the file 'notes.txt' is not an image (PNG, JPEG, TIFF, BMP or DICOM)",
        ),
        "truncated image": (
            {"url": up, "files": {"file": ("cut.png", png[: len(png) // 2])}},
            422, "the image 'cut.png' is truncated or incomplete",
        ),
        "empty file": (
            {"url": up, "files": {"file": ("empty.png", b"")}},
            422, "the uploaded file 'empty.png' is empty",
        ),
        "damaged DICOM": (
            {"url": up, "files": {"file": ("scan.dcm", bytes(dicom[: len(dicom) // 3]))}},
            422, "the image 'scan.dcm' is truncated or incomplete",
        ),
        "decompression bomb": (
            {"url": up, "files": {"file": ("bomb.png", bomb_png(30000, 30000))}},
            413, "the image 'bomb.png' has more pixels than this server's limit of 4,000,000",
        ),
        "too many pixels": (
            {"url": up, "files": {"file": ("big.png", png_bytes(np.zeros((2000, 2100), np.uint8)))}},
            413, "the image 'big.png' is 2100x2000 pixels, over this server's limit of "
            "4,000,000 pixels",
        ),
        "upload over the limit": (
            {"url": up, "files": {"file": ("huge.png", b"\0" * (2 * 2**20 + 1))}},
            413, "the upload is larger than this server's limit of 2 MiB",
        ),
        "declared length over the limit": (
            {"url": up, "files": {"file": ("huge.png", b"\0" * (3 * 2**20))}},
            413, "the upload is larger than this server's limit of 2 MiB",
        ),
        "unknown task": (
            {"url": "/predict/lung", "files": {"file": ("a.png", png)}},
            404, "unknown task 'lung'; this server serves busi, breast, breast-lora, "
            "breast-adapter, breast-bitfit",
        ),
        "wrong method": (
            {"method": "GET", "url": up}, 405, "GET is not allowed on /predict/busi; use POST",
        ),
        "wrong method on tasks": (
            {"method": "DELETE", "url": "/tasks"}, 405, "DELETE is not allowed on /tasks; use GET",
        ),
        "unknown path": (
            {"method": "GET", "url": "/predictions"}, 404,
            "there is no /predictions on this server (see /docs)",
        ),
        "not multipart": (
            {"url": up, "content": png, "headers": {"content-type": "image/png"}},
            415, "send the image as multipart/form-data in the field 'file'",
        ),
        "no boundary": (
            {"url": up, "content": png, "headers": {"content-type": "multipart/form-data"}},
            400, "the multipart body has no boundary in its Content-Type",
        ),
        "no file field": (
            {"url": up, "files": {"image": ("a.png", png)}},
            422, "the upload has no file in the form field 'file'",
        ),
        "body cut short": (
            {"url": up, "content": cut_body, "headers": {"content-type": cut_type}},
            400, "the multipart body ended before the file part did",
        ),
        "bad query value": (
            {"url": up + "?heatmap=maybe", "files": {"file": ("a.png", png)}},
            422, "the query parameter 'heatmap' is invalid: input should be a valid boolean, "
            "unable to interpret input",
        ),
    }  # fmt: skip


BAD = [
    "not an image", "truncated image", "empty file", "damaged DICOM", "decompression bomb",
    "too many pixels", "upload over the limit", "declared length over the limit", "unknown task",
    "wrong method", "wrong method on tasks", "unknown path", "not multipart", "no boundary",
    "no file field", "body cut short", "bad query value",
]  # fmt: skip


def send(client: TestClient, request: dict):
    request = dict(request)
    return client.request(request.pop("method", "POST"), request.pop("url"), **request)


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_4xx(client, images, case):
    request, status, message = bad_requests(images)[case]
    r = send(client, request)
    assert (r.status_code, r.json()) == (status, {"detail": message})


def test_chunked_upload_over_the_limit_stops_at_the_limit(client):
    body, ctype = multipart("file", "stream.png", b"\0" * (3 * 2**20))
    sent = []

    def chunks():
        for i in range(0, len(body), 2**16):
            sent.append(i)
            yield body[i : i + 2**16]

    r = client.post("/predict/busi", content=chunks(), headers={"content-type": ctype})
    assert (r.status_code, r.json()["detail"]) == (
        413, "the upload is larger than this server's limit of 2 MiB"
    )  # fmt: skip


def test_bad_inputs_never_leak_into_good_requests(client, runs, images):
    """Bad and good requests interleaved from several threads: the good ones are unchanged."""
    path = images["normal.png"]
    want = {n: reference_logits(runs[n], path) for n in runs}
    bad = list(bad_requests(images).values())

    def good(name: str):
        return name, post(client, f"/predict/{name}", path)

    with ThreadPoolExecutor(4) as pool:
        futures = []
        for i in range(3 * len(bad)):
            futures.append(pool.submit(send, client, bad[i % len(bad)][0]))
            futures.append(pool.submit(good, list(runs)[i % len(runs)]))
        answers = [f.result() for f in futures]
    for bad_answer in answers[0::2]:
        assert 400 <= bad_answer.status_code < 500
    for name, r in answers[1::2]:
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["logits"]), want[name], atol=1e-5, rtol=0)
    assert client.get("/health").json()["status"] == "ok"


def test_uploads_never_touch_the_disk(client, images, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", refuse)
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > starlette.formparsers.MultiPartParser.spool_max_size  # Starlette spools
    r = client.post("/predict/busi", files={"file": ("noise.png", data)})
    assert r.status_code == 200, r.text


def test_refused_task_says_why(runs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with make_client({"busi": runs["busi"], "broken": broken}) as c:
        assert c.get("/health").json()["refused"] == 1
        refused = c.get("/tasks").json()["refused"]
        reason = f"{broken} is not a shpeft run directory (no config.json)"
        assert refused == [{"name": "broken", "run_dir": str(broken), "reason": reason}]
        r = c.post("/predict/broken", files={"file": ("a.png", b"x")})
        assert (r.status_code, r.json()["detail"]) == (
            404, f"task 'broken' was refused at start-up: {reason}"
        )  # fmt: skip


def test_api_key_on_every_request(runs, images):
    png = images["benign.png"].read_bytes()
    with make_client({"busi": runs["busi"]}, api_key=KEY, allowed_hosts=None) as c:
        for method, url in [("GET", "/"), ("GET", "/health"), ("GET", "/tasks"),
                            ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/predict/busi"),
                            ("GET", "/nothing")]:  # fmt: skip
            for headers in ({}, {"X-API-Key": "wrong" * 5}, {"Authorization": "Bearer nope"}):
                r = c.request(method, url, headers=headers)
                assert r.status_code == 401, (method, url, headers)
                assert r.json() == {
                    "detail": "this server needs its API key (X-API-Key or Authorization header)"
                }
                assert r.headers["www-authenticate"] == 'Basic realm="shpeft"'
        basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"},
                        {"Authorization": f"Basic {basic}"}):  # fmt: skip
            r = c.post("/predict/busi", files={"file": ("a.png", png)}, headers=headers)
            assert r.status_code == 200


def test_loopback_server_refuses_foreign_host_names(runs):
    """Without a key, a page of another site cannot reach the server by DNS rebinding."""
    with make_client({"busi": runs["busi"]}) as c:
        assert c.get("/health").status_code == 200
        for host in ("localhost:8000", "[::1]:8000"):
            assert c.get("/health", headers={"host": host}).status_code == 200
        r = c.get("/health", headers={"host": "attacker.example:8000"})
        assert (r.status_code, r.json()["detail"]) == (
            421, "this server only answers requests addressed to it by a loopback name"
        )  # fmt: skip


def test_openapi_schema(client):
    schema = client.get("/openapi.json").json()
    assert {"/health", "/tasks", "/predict/{task}", "/predict"} <= set(schema["paths"])
    op = schema["paths"]["/predict/{task}"]["post"]
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"] and form["properties"]["file"]["format"] == "binary"
    assert {"404", "413", "415", "422"} <= set(op["responses"])


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text  # works offline
