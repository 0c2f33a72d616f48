"""`vitlab serve` through FastAPI's test client: the API, its answers to bad input and to load, and
the dynamic batcher on its own."""
from __future__ import annotations

import asyncio
import base64
import io
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from vitlab.checkpoint import LoadedModel  # noqa: E402
from vitlab.hub import load_model  # noqa: E402
from vitlab.serve.app import UploadLimits, create_app  # noqa: E402
from vitlab.serve.batcher import Batcher, QueueFull  # noqa: E402
from vitlab.serve.config import ServeConfig  # noqa: E402

NAME = "vit_conv_32px.vitlab_cifar10"


def png(size=(48, 40), colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, colour)
    image.paste((20, 160, 60), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(data: bytes, name: str = "image.png") -> dict:
    return {"file": (name, data, "image/png")}


@pytest.fixture(scope="module")
def loaded():
    return load_model(NAME)


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(loaded, ServeConfig(max_upload_mb=1), name=NAME)) as c:
        yield c


class Slow(nn.Module):
    """A model that takes ``delay`` seconds per forward and records its batch sizes."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.delay, self.batches = inner, delay, []
        self.cfg = inner.cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        time.sleep(self.delay)
        return self.inner(x)


def concurrently(client: TestClient, n: int, path: str = "/v1/predict") -> list:
    """``n`` uploads at once from ``n`` threads: their responses."""
    responses, data = [None] * n, png()

    def send(i: int) -> None:
        responses[i] = client.post(path, files=upload(data))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return responses


# ---------------------------------------------------------------- the API

def test_predict_gives_the_libraries_top_k(client, loaded, tmp_path):
    from vitlab.predict import predict

    r = client.post("/v1/predict", files=upload(png()))
    assert r.status_code == 200
    got = r.json()["predictions"]
    (tmp_path / "a.png").write_bytes(png())
    want = predict(loaded, [tmp_path / "a.png"], top_k=5)[0]
    assert [p["label"] for p in got] == want.labels
    assert [p["prob"] for p in got] == pytest.approx(want.probs, abs=1e-5)
    assert r.json()["model"] == NAME
    assert len(client.post("/v1/predict?k=2", files=upload(png())).json()["predictions"]) == 2
    assert len(client.post("/v1/predict?k=50", files=upload(png())).json()["predictions"]) == 10  # all there are


def test_attention_arrays_are_inspects_rollout_and_heads(client, loaded):
    from vitlab.inspect import attention_maps

    r = client.post("/v1/attention?format=array", files=upload(png()))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["grid"] == [8, 8] and body["layers"] == list(range(6))
    assert len(body["heads"]) == 6 and all(len(layer) == 3 for layer in body["heads"])
    x = loaded.preprocess(Image.open(io.BytesIO(png())).convert("RGB"))[None]
    rollout, heads, logits = attention_maps(loaded.model, x)
    assert torch.tensor(body["rollout"]) == pytest.approx(rollout[0], abs=1e-5)
    assert torch.tensor(body["heads"][-1]) == pytest.approx(heads[0], abs=1e-5)
    top = logits[0].softmax(-1).topk(5)
    assert [p["index"] for p in body["predictions"]] == top.indices.tolist()
    image = Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1])))
    assert image.size == (32, 32)  # what the model saw


def test_attention_pngs_and_layer_choice(client):
    body = client.post("/v1/attention?layer=-1&k=1", files=upload(png())).json()
    assert body["layers"] == [5] and len(body["heads"]) == 1 and len(body["predictions"]) == 1
    for url in [body["rollout"], *body["heads"][0]]:
        assert url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (32, 32)
    r = client.post("/v1/attention?layer=6", files=upload(png()))
    assert r.status_code == 422 and "0..5" in r.json()["error"]
    r = client.post("/v1/attention?format=array&head_fusion=max&discard_ratio=0.5", files=upload(png()))
    assert r.status_code == 200


def test_a_class_token_model_reads_the_class_row():
    import vitlab

    model = vitlab.create_model("vit_mu4_32px").eval()
    with TestClient(create_app(LoadedModel(model), name="mu")) as c:
        body = c.post("/v1/attention?format=array", files=upload(png())).json()
        info = c.get("/v1/model").json()
    assert body["grid"] == [8, 8] and len(body["heads"]) == 6 and len(body["heads"][0]) == 4
    assert info["labels"] == [str(i) for i in range(10)] and info["accuracy"] is None


def test_model_card_and_posemb(client):
    info = client.get("/v1/model").json()
    assert info["name"] == NAME and info["parameters"] == 2_335_018 and info["resolution"] == [32, 32]
    assert info["labels"][:2] == ["airplane", "automobile"] and info["accuracy"]["top1"] == 82.59
    assert info["attention"] == {"layers": 6, "heads": 3} and info["posemb"]
    assert info["card"]["GFLOPs per image"] == "0.315"
    r = client.get("/v1/posemb.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).format == "PNG"


def test_page_docs_and_health(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "//cdn" not in page.text
    for asset in ("app.js", "style.css"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text  # works offline
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/attention", "/v1/model", "/healthz"} <= set(paths)
    assert client.get("/healthz").json()["status"] == "ok"


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("data, name, status, words", [
    (b"hello, not an image", "notes.txt", 415, "cannot identify image file notes.txt"),
    (b"", "empty.png", 415, "empty.png"),
    (png()[:70], "cut.png", 422, "cut.png"),
    (png()[:8] + b"\0" * 200, "bad.png", 415, "bad.png"),
])
def test_bad_uploads_get_one_line_json(client, data, name, status, words):
    r = client.post("/v1/predict", files=upload(data, name))
    assert r.status_code == status
    assert words in r.json()["error"] and "\n" not in r.json()["error"]


def test_pixel_cap_is_vitlabs(client, monkeypatch):
    monkeypatch.setenv("VITLAB_MAX_PIXELS", "1000")
    r = client.post("/v1/attention", files=upload(png((48, 40))))
    assert r.status_code == 422
    assert r.json()["error"] == ("cannot read image image.png: 48 x 40 pixels is over the cap of 1,000 "
                                 "(set VITLAB_MAX_PIXELS to raise it)")


def test_uploads_over_the_size_cap_get_413(client):
    big = b"\x89PNG" + b"\0" * (1024 * 1024)
    r = client.post("/v1/predict", files=upload(big))
    assert r.status_code == 413 and "over the cap of 1,048,576" in r.json()["error"]

    def chunks():  # no Content-Length: counted while reading
        for _ in range(20):
            yield b"x" * 100_000

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and "over the cap" in r.json()["error"]


def test_bad_requests_get_422_and_the_server_keeps_answering(client):
    for r in (client.post("/v1/predict"), client.post("/v1/predict?k=0", files=upload(png())),
              client.post("/v1/attention?format=jpeg", files=upload(png())),
              client.post("/v1/predict", data={"file": "text"})):
        assert r.status_code == 422 and list(r.json()) == ["error"], r.text
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.post("/v1/predict", files=upload(png())).status_code == 200


def test_a_decompression_bomb_is_refused_from_its_header(client):
    buffer = io.BytesIO()
    Image.new("1", (8000, 6000)).save(buffer, format="PNG")  # 48 million pixels in a few kB
    r = client.post("/v1/predict", files=upload(buffer.getvalue(), "bomb.png"))
    assert r.status_code == 422 and "8000 x 6000 pixels is over the cap" in r.json()["error"]


def test_the_server_survives_garbage(client):
    import random

    rng = random.Random(0)
    good = png()
    bodies = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 3000))) for _ in range(10)]
    bodies += [good[:n] for n in (8, 16, 33, 60)]
    bodies += [good[:n] + bytes(rng.getrandbits(8) for _ in range(20)) + good[n + 20:] for n in (30, 50, 80)]
    for body in bodies:  # an answer for each, JSON when refused (a flipped byte may still decode)
        for path in ("/v1/predict", "/v1/attention"):
            r = client.post(path, files=upload(body))
            assert r.status_code in (200, 415, 422) and (r.status_code == 200 or list(r.json()) == ["error"])
    for raw, kind in ((b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\nab", "multipart/form-data; boundary=b"),
                      (b"\x00\xff" * 50, "multipart/form-data; boundary=b"), (b"{}", "application/json"),
                      (good, "image/png"), (b"", "multipart/form-data")):
        r = client.post("/v1/predict", content=raw, headers={"content-type": kind})
        assert 400 <= r.status_code < 500 and list(r.json()) == ["error"], (raw[:20], r.status_code, r.text)
    assert client.post("/v1/predict", files=upload(good)).status_code == 200


def test_a_model_without_attention_says_so():
    from vitlab.config import BiTConfig
    from vitlab.models import build_model

    model = build_model(BiTConfig(image_size=32, layers=(1, 1, 1, 1), width_factor=1, num_classes=3)).eval()
    with TestClient(create_app(LoadedModel(model), name="bit")) as c:
        r = c.post("/v1/attention", files=upload(png()))
        assert r.status_code == 409 and "no attention layers" in r.json()["error"]
        assert c.get("/v1/posemb.png").status_code == 404
        assert c.get("/v1/model").json()["attention"] is None
        assert c.post("/v1/predict", files=upload(png())).status_code == 200


def test_a_client_that_stalls_mid_upload_gets_408():
    sent = []

    async def app(scope, receive, send):  # reads the body, as FastAPI's form parsing does
        while (await receive()).get("more_body"):
            pass

    async def stalled():
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": [(b"content-length", b"100")]}
    t = time.perf_counter()
    asyncio.run(UploadLimits(app, max_bytes=1000, read_timeout_s=0.05)(scope, stalled, send))
    assert time.perf_counter() - t < 5
    assert sent[0]["status"] == 408 and b"paused over 0.05 s" in sent[1]["body"]


# ---------------------------------------------------------------- load

def test_concurrent_requests_share_batches(loaded):
    slow = Slow(loaded.model, 0.02)
    cfg = ServeConfig(max_batch=8, batch_window_ms=300)
    with TestClient(create_app(LoadedModel(slow, loaded.class_names, loaded.meta), cfg, name="m")) as c:
        responses = concurrently(c, 8)
        health = c.get("/healthz").json()
    assert [r.status_code for r in responses] == [200] * 8
    assert max(slow.batches) > 1 and sum(slow.batches) == 8 and health["items"] == 8
    assert len({r.json()["predictions"][0]["label"] for r in responses}) == 1


def test_a_full_queue_answers_503_with_retry_after(loaded):
    slow = Slow(loaded.model, 0.3)
    cfg = ServeConfig(max_batch=1, batch_window_ms=0, max_queue=1)
    with TestClient(create_app(LoadedModel(slow, loaded.class_names, loaded.meta), cfg, name="m")) as c:
        responses = concurrently(c, 6)
        codes = sorted(r.status_code for r in responses)
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]
        assert c.post("/v1/predict", files=upload(png())).status_code == 200  # and it recovers


def test_a_slow_answer_gets_504(loaded):
    slow = Slow(loaded.model, 0.4)
    with TestClient(create_app(LoadedModel(slow, loaded.class_names, loaded.meta), ServeConfig(timeout_s=0.1))) as c:
        r = c.post("/v1/predict", files=upload(png()))
        assert r.status_code == 504 and "within 0.1 s" in r.json()["error"]
        slow.delay = 0
        time.sleep(0.5)  # the abandoned batch still finishes on the model's thread
        assert c.post("/v1/predict", files=upload(png())).status_code == 200


def test_serve_config_checks_its_numbers():
    with pytest.raises(ValueError, match="max_batch = 0; it must be >= 1"):
        ServeConfig(max_batch=0)
    with pytest.raises(ValueError, match="timeout_s = 0.0; it must be > 0"):
        ServeConfig(timeout_s=0.0)
    with pytest.raises(ValueError, match="port = 70000"):
        ServeConfig(port=70000)


# ---------------------------------------------------------------- the batcher alone

def run_batcher(coroutine_fn, run, **options):
    async def main():
        batcher = Batcher(run, **options)
        batcher.start()
        try:
            return await coroutine_fn(batcher)
        finally:
            await batcher.stop()
    return asyncio.run(main())


def test_batcher_groups_by_key_up_to_max_batch():
    calls = []

    def run(key, items):
        calls.append((key, list(items)))
        return [f"{key}:{i}" for i in items]

    async def main(b):
        jobs = [b.submit("a" if i % 3 else "b", i, timeout=5) for i in range(10)]
        return await asyncio.gather(*jobs)

    results = run_batcher(main, run, max_batch=4, window_s=0.05)
    assert results == [f"{'a' if i % 3 else 'b'}:{i}" for i in range(10)]
    assert all(len(items) <= 4 for _, items in calls) and len(calls) < 10
    assert all(len({k}) == 1 for k, _ in calls)


def test_the_window_waits_only_for_requests_on_their_way():
    calls = []

    def run(key, items):
        calls.append(list(items))
        return items

    async def main(b):
        t = time.perf_counter()
        assert await b.submit("k", "alone", timeout=5) == "alone"  # nothing on its way: no 2 s window
        alone = time.perf_counter() - t
        with b.coming():  # a second request is being decoded ...
            first = asyncio.ensure_future(b.submit("k", "first", timeout=5))
            await asyncio.sleep(0.2)  # ... the first one's window waits for it
        second = await b.submit("k", "second", timeout=5)
        return alone, await first, second

    alone, first, second = run_batcher(main, run, max_batch=4, window_s=2.0)
    assert alone < 1.0 and (first, second) == ("first", "second")
    assert calls == [["alone"], ["first", "second"]]


def test_batcher_refuses_when_full_skips_timed_out_jobs_and_survives_errors():
    ran, release = [], threading.Event()

    def run(key, items):
        ran.extend(items)
        if key == "fail":
            raise RuntimeError("boom")
        release.wait(5)
        return items

    async def main(b):
        first = asyncio.ensure_future(b.submit("k", "running", timeout=5))
        await asyncio.sleep(0.05)  # the worker holds it
        late = asyncio.ensure_future(b.submit("k", "times out", timeout=0.05))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit("k", "refused", timeout=5)
        with pytest.raises(TimeoutError):
            await late
        release.set()
        assert await first == "running"
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit("fail", "x", timeout=5)
        return await b.submit("k", "after", timeout=5)

    assert run_batcher(main, run, max_batch=1, window_s=0, max_queue=1) == "after"
    assert "times out" not in ran and "refused" not in ran


# ---------------------------------------------------------------- the CLI

def test_serve_without_the_extra_names_it(monkeypatch, capsys):
    from vitlab.cli import main

    monkeypatch.delitem(sys.modules, "vitlab.serve.app", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "--model", NAME]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "pip install 'vitlab[serve]'" in err


def test_serve_options_come_from_serve_config():
    from vitlab.cli import parse_args

    args = parse_args(["serve", "--model", NAME, "--max-batch", "1", "--no-access-log", "--port", "0"])
    assert {k: getattr(args, k) for k in args.config_options if hasattr(args, k)} == \
        {"max_batch": 1, "access_log": False, "port": 0}


def test_keep_alive_connections_get_tcp_nodelay():
    # asyncio sets TCP_NODELAY only on connections of a socket whose protocol is IPPROTO_TCP; without it
    # every request after the first on a keep-alive connection waited ~40 ms (Nagle against delayed ACK).
    import asyncio
    import socket

    from vitlab.serve.app import listen_socket

    async def accepted_nodelay() -> int:
        sock = listen_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    assert asyncio.run(accepted_nodelay()) == 1
    with pytest.raises(ValueError, match="pass another --port"):
        with listen_socket("127.0.0.1", 0) as taken:
            taken.listen()
            listen_socket("127.0.0.1", taken.getsockname()[1]).close()
