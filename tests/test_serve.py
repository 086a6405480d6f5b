"""`unidml serve`: the HTTP search API over a tiny checkpoint and index, queried on loopback with http.client.

The server runs in a thread of the test process (and once as the real command in a subprocess); answers
are checked against the index searched directly with the catalogue's stored embeddings."""
from __future__ import annotations

import http.client
import importlib.util
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from command_helpers import TINY_RUN, command, write_untrained_checkpoint

from unidml.evaluation.embedding_files import read_embeddings
from unidml.launcher.commands import embed, index
from unidml.serving.batcher import MicroBatcher
from unidml.serving.catalogue import ServedIndex
from unidml.serving.errors import RequestError
from unidml.serving.http_service import SearchServer
from unidml.serving.search_service import ServiceLimits, open_service

REPO = Path(__file__).resolve().parents[1]
LIMITS = ServiceLimits(max_upload_bytes=100_000, max_k=8, default_k=5, max_batch=32, batch_window_s=0.3)


@dataclass(frozen=True)
class Catalogue:
    checkpoint: Path
    index: Path
    embeddings: Path
    gallery: Path  # the gallery root: every indexed image is below it
    outside: Path  # a folder beside it, never served


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Catalogue:
    """The tiny run's test images as a class-folder catalogue, embedded (`unidml embed`) and indexed (exact)."""
    from unidml.data_pipeline import build_dataset
    from unidml.run_config import load_for_inference

    root = tmp_path_factory.mktemp("serve")
    checkpoint = write_untrained_checkpoint(root, TINY_RUN)
    test = build_dataset(load_for_inference(checkpoint)[1].data).splits["test"]
    gallery = root / "gallery"
    for i, (path, label) in enumerate(zip(test.paths, test.labels)):
        target = gallery / f"class{label}" / f"{i:02d}_{Path(path).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n secret, never served")
    assert command(embed, ["--checkpoint", str(checkpoint), "--images", str(gallery),
                           "--out", str(root / "emb.npy")]) == 0
    assert command(index, ["--embeddings", str(root / "emb.npy"), "--out", str(root / "g.index")]) == 0
    return Catalogue(checkpoint, root / "g.index", root / "emb.npy", gallery, outside)


@pytest.fixture(scope="module")
def server(catalogue):
    """(host, port) of the service on a free loopback port, served from a thread."""
    service = open_service(str(catalogue.checkpoint), str(catalogue.index), [], LIMITS)
    httpd = SearchServer(("127.0.0.1", 0), service)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[:2]
    httpd.shutdown()
    httpd.server_close()
    service.close()


def call(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one request, the path sent exactly as given (no client normalisation)."""
    connection = http.client.HTTPConnection(*server, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def call_json(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    status, got_headers, data = call(server, method, path, body, headers)
    assert got_headers["Content-Type"] == "application/json", (status, data[:200])
    return status, got_headers, json.loads(data)


def gallery_rows(catalogue) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(stored embeddings, labels, paths relative to the gallery root) of the index's rows."""
    vectors, labels, paths, _ = read_embeddings(catalogue.embeddings)
    return vectors, labels, [Path(p).relative_to(catalogue.gallery.resolve()).as_posix() for p in paths]


def multipart(data: bytes, boundary: str = "unidml-test-boundary") -> tuple[bytes, dict]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_a_gallery_image_finds_itself_first_and_the_index_order_after(server, catalogue):
    vectors, labels, relative = gallery_rows(catalogue)
    served = ServedIndex(catalogue.index)
    for row in (0, 7, 14):
        data = (catalogue.gallery / relative[row]).read_bytes()
        status, _, answer = call_json(server, "POST", "/search?k=4", data, {"Content-Type": "image/jpeg"})
        assert status == 200 and answer["k"] == 4 and answer["metric"] == "cosine"
        hits = answer["results"]
        top = hits[0]
        assert top["id"] == row and top["path"] == relative[row] and top["label"] == int(labels[row])
        assert top["score"] == pytest.approx(1.0, abs=1e-5)  # the same image through the same transform (fp32)
        # The independent reference: the index searched with the catalogue's stored embedding of the image.
        want = served.search(vectors[row:row + 1], 4, exclude=[])
        assert [h["id"] for h in hits] == want.ids[0].tolist()
        assert [h["score"] for h in hits] == pytest.approx(want.scores[0].tolist(), abs=1e-5)
        assert [h["rank"] for h in hits] == [1, 2, 3, 4]
        assert all(h["path"] == relative[h["id"]] and h["url"] == "/gallery/" + quote(h["path"]) for h in hits)
    status, headers, image = call(server, "GET", hits[1]["url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg" == mimetypes.guess_type(hits[1]["path"])[0]
    assert image == (catalogue.gallery / hits[1]["path"]).read_bytes()
    body, headers = multipart(data)  # the last query again, as a form upload, with the default k
    status, _, answer = call_json(server, "POST", "/search", body, headers)
    ids = [h["id"] for h in answer["results"]]
    assert status == 200 and len(ids) == LIMITS.default_k and ids[:4] == want.ids[0].tolist()


def test_concurrent_queries_are_answered_correctly_in_shared_batches(server, catalogue):
    _, _, relative = gallery_rows(catalogue)
    rows = [1, 3, 5, 8, 10, 12]
    before = call_json(server, "GET", "/healthz")[2]["batching"]
    start, answers = threading.Barrier(len(rows)), {}

    def query(row: int) -> None:
        data = (catalogue.gallery / relative[row]).read_bytes()
        start.wait()
        answers[row] = call_json(server, "POST", "/search?k=2", data)

    threads = [threading.Thread(target=query, args=(row,)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == rows
    for row, (status, _, answer) in answers.items():
        assert status == 200 and answer["results"][0]["id"] == row
        assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)  # batched: the same embeddings
    sizes = [answer["batch_size"] for _, _, answer in answers.values()]
    after = call_json(server, "GET", "/healthz")[2]["batching"]
    # eval.batch_size=4 caps a batch (one forward pass); six queries within the 0.3 s window fill one or more.
    assert after["max_batch"] == 4 and max(sizes) >= 2 and all(1 <= s <= 4 for s in sizes)
    assert after["requests"] - before["requests"] == 6 and after["batches"] - before["batches"] < 6
    assert after["largest_batch"] >= max(sizes)


def test_bad_requests_get_json_errors_with_their_status(server, catalogue):
    _, _, relative = gallery_rows(catalogue)
    image = (catalogue.gallery / relative[0]).read_bytes()
    cases = [
        ("POST", "/search", b"this is not an image", {}, 400, "not a readable image"),
        ("POST", "/search", image[: len(image) // 2], {}, 400, "not a readable image"),  # truncated PNG
        ("POST", "/search", b"", {}, 400, "empty upload"),
        ("POST", "/search", b"x" * (LIMITS.max_upload_bytes + 1), {}, 413, "over the limit of 100000 bytes"),
        ("POST", "/search?k=0", image, {}, 400, "between 1 and 8"),
        ("POST", "/search?k=9", image, {}, 400, "between 1 and 8"),
        ("POST", "/search?k=two", image, {}, 400, "expected a positive integer"),
        ("POST", "/search", multipart(b"")[0], multipart(b"")[1], 400, "file is empty"),
        ("GET", "/nope", None, {}, 404, "no route /nope"),
        ("GET", "/search", None, {}, 405, "GET is not allowed"),
        ("POST", "/healthz", b"{}", {}, 405, "POST is not allowed"),
        ("PUT", "/", b"x", {}, 405, "PUT is not allowed"),
        ("DELETE", "/gallery/" + relative[0], None, {}, 405, "DELETE is not allowed"),
    ]
    for method, path, body, headers, status, fragment in cases:
        got, got_headers, answer = call_json(server, method, path, body, headers)
        assert (got, answer["status"]) == (status, status), (method, path, answer)
        assert fragment in answer["error"], (method, path, answer)
        if status == 405:
            assert got_headers["Allow"] in ("GET", "POST")
    # A body larger than 4 x the limit is refused unread: the client may see the 413 or a reset connection.
    try:
        assert call_json(server, "POST", "/search", b"x" * (5 * LIMITS.max_upload_bytes))[0] == 413
    except (ConnectionError, http.client.HTTPException):
        pass
    assert call_json(server, "GET", "/healthz")[0] == 200  # and the server is still up


def test_gallery_files_never_come_from_outside_the_gallery_root(server, catalogue):
    _, _, relative = gallery_rows(catalogue)
    secret = catalogue.outside / "secret.png"
    tricks = ["/gallery/../outside/secret.png", "/gallery/%2e%2e/outside/secret.png",
              "/gallery/%2E%2E%2Foutside%2Fsecret.png", "/gallery/%252e%252e/outside/secret.png",
              f"/gallery/{relative[0].split('/')[0]}/../../outside/secret.png",
              "/gallery/" + str(secret), "/gallery/" + quote(str(secret), safe=""), "/gallery//etc/passwd",
              "/gallery/./" + relative[0], "/gallery/" + relative[0].replace("/", "//"), "/gallery/", "/gallery"]
    for path in tricks:
        status, _, answer = call_json(server, "GET", path)
        assert status == 404 and b"secret" not in json.dumps(answer).encode(), path
    escape = catalogue.gallery / "escape.png"  # a symlink out of the root that the index does not list
    escape.symlink_to(secret)
    try:
        assert call_json(server, "GET", "/gallery/escape.png")[0] == 404
    finally:
        escape.unlink()
    listed = catalogue.gallery / relative[2]  # an indexed image replaced by a symlink out of the root
    kept = listed.with_name(listed.name + ".kept")
    listed.rename(kept)
    listed.symlink_to(secret)
    try:
        status, _, answer = call_json(server, "GET", "/gallery/" + quote(relative[2]))
        assert status == 403 and "outside the gallery root" in answer["error"]
    finally:
        listed.unlink()
        kept.rename(listed)
    assert call(server, "GET", "/gallery/" + quote(relative[2]))[0] == 200


def test_healthz_describes_the_model_index_and_limits(server):
    status, _, health = call_json(server, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert health["model"] == {"arch": "resnet18", "embedding_dim": 512, "image_size": 32}
    assert health["index"] == {"count": 15, "metric": "cosine", "factory": "Flat"}
    assert health["limits"]["max_upload_bytes"] == LIMITS.max_upload_bytes and health["limits"]["max_k"] == 8
    assert set(health["batching"]) == {"requests", "batches", "largest_batch", "max_batch", "window_ms"}


def test_page_has_the_upload_form_and_its_script_calls_search(server, tmp_path):
    from unidml.serving.page import SCRIPT

    status, headers, body = call(server, "GET", "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<form id="search"' in page and 'type="file"' in page and 'name="k"' in page
    assert SCRIPT in page and "fetch(`/search?k=${encodeURIComponent(k)}`" in SCRIPT and 'fetch("/healthz")' in SCRIPT
    assert "innerHTML" not in SCRIPT  # results go in as text, never as markup
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    if shutil.which("node"):  # the script at least parses
        (tmp_path / "page.js").write_text(SCRIPT)
        done = subprocess.run(["node", "--check", str(tmp_path / "page.js")], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def browser() -> str | None:
    """A Chromium/Chrome binary when Playwright can drive it, else None."""
    if importlib.util.find_spec("playwright") is None:
        return None
    found = [shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome")]
    return next((path for path in found if path), None)


def test_page_shows_the_results_in_a_headless_browser(server, catalogue):
    executable = browser()
    if executable is None:
        pytest.skip("no headless browser: needs the playwright package and a chromium/chrome binary on PATH")
    from playwright.sync_api import sync_playwright

    _, _, relative = gallery_rows(catalogue)
    with sync_playwright() as playwright:
        chrome = playwright.chromium.launch(executable_path=executable, headless=True)
        page = chrome.new_page(viewport={"width": 1100, "height": 700})
        page.goto(f"http://{server[0]}:{server[1]}/")
        page.set_input_files("#image", str(catalogue.gallery / relative[0]))
        page.fill("#k", "6")
        page.click("button[type=submit]")
        page.wait_for_selector(".hit:nth-child(6)")
        assert page.locator(".hit .path").first.text_content() == relative[0]
        assert page.evaluate("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth)")
        page.screenshot(path=str(REPO / "docs" / "serve_page.png"))
        chrome.close()


def test_batcher_caps_batches_refuses_when_full_and_passes_failures():
    seen, release = [], threading.Event()

    def work(items: list[int]) -> list[int]:
        release.wait(timeout=30)
        seen.append(list(items))
        if -1 in items:
            raise ValueError("bad item")
        return [2 * i for i in items]

    batcher = MicroBatcher(work, max_items=2, window_s=0.2, max_waiting=3)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.setdefault(i, batcher.submit(i))) for i in (1, 2, 3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # the worker holds a batch of two inside `work`; one item waits
    fillers = [threading.Thread(target=batcher.submit, args=(0,)) for _ in range(2)]
    for thread in fillers:
        thread.start()
    time.sleep(0.2)
    with pytest.raises(RequestError) as full:
        batcher.submit(9)
    assert full.value.status == 503
    release.set()
    for thread in threads + fillers:
        thread.join(timeout=30)
    assert {i: r for i, (r, _) in results.items()} == {1: 2, 2: 4, 3: 6}
    assert all(len(batch) <= 2 for batch in seen)
    with pytest.raises(ValueError, match="bad item"):
        batcher.submit(-1)
    assert batcher.submit(5) == (10, 1)  # the worker survived the failure
    batcher.close()


def test_serve_command_listens_answers_and_stops_on_interrupt(catalogue):
    cmd = [sys.executable, "-m", "unidml", "serve", "--checkpoint", str(catalogue.checkpoint),
           "--index", str(catalogue.index), "--port", "0", "--batch-window-ms", "1"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = process.stdout.readline()
        assert "serving 15 indexed images on http://127.0.0.1:" in line, process.stderr.read()[-2000:]
        address = urlsplit(line.split()[5])
        status, _, health = call_json((address.hostname, address.port), "GET", "/healthz")
        assert status == 200 and health["index"]["count"] == 15
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
