"""The FastAPI app: the page at ``/``, ``POST /v1/predict``, ``POST /v1/attention``, ``GET /v1/model``,
``GET /v1/posemb.png``, ``GET /healthz``; OpenAPI docs at ``/docs``. Errors are ``{"error": "one line"}``."""
from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..checkpoint import LoadedModel
from .batcher import Batcher, QueueFull
from .config import ServeConfig
from .inference import PREDICT, NotAnImage, ServedModel, overlay, png_data_url

STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = 1


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error shape: ``{"error": message}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Refused(Exception):
    """Raised from ``receive`` to stop the app reading a body that is refused."""


class UploadLimits:
    """ASGI middleware: a body over ``max_bytes`` gets 413 (from Content-Length before reading, else
    while reading), and a client that pauses over ``read_timeout_s`` mid-upload gets 408. Whatever the
    app makes of the cut-off body is replaced by that answer."""

    def __init__(self, app: Any, *, max_bytes: int, read_timeout_s: float) -> None:
        self.app, self.max_bytes, self.read_timeout_s = app, max_bytes, read_timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await refuse(send, 413, f"upload of {int(length):,} bytes is over the cap of "
                                           f"{self.max_bytes:,} (vitlab serve --max-upload-mb)")
        received, done, refusal = 0, False, None

        async def limited_receive() -> dict:
            nonlocal received, done, refusal
            if done:  # the body is in: later reads wait for a disconnect, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                refusal = (408, f"the upload paused over {self.read_timeout_s:g} s; send it again "
                                f"(vitlab serve --read-timeout-s)")
                raise _Refused from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = (413, f"upload is over the cap of {self.max_bytes:,} bytes (vitlab serve "
                                    f"--max-upload-mb)")
                    raise _Refused
            return message

        async def guarded_send(message: dict) -> None:
            if refusal is None:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None:
            await refuse(send, *refusal)


async def refuse(send: Any, status: int, message: str) -> None:
    """Send ``error(status, message)`` straight to the ASGI ``send``, closing the connection."""
    await error(status, message, {"connection": "close"})({"type": "http"}, None, send)


def create_app(loaded: LoadedModel, cfg: ServeConfig = ServeConfig(), *, name: str = "model") -> FastAPI:
    """The app serving ``loaded`` under ``cfg``'s batching, queue, timeout and upload limits."""
    served = ServedModel(loaded, name)
    batcher = Batcher(served.run, max_batch=cfg.max_batch, window_s=cfg.batch_window_ms / 1000,
                      max_queue=cfg.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"vitlab serve: {name}", lifespan=lifespan,
                  description="A Vision Transformer's predictions and attention. Errors: `{\"error\": \"...\"}`.")
    app.state.served, app.state.batcher, app.state.config = served, batcher, cfg
    app.add_middleware(UploadLimits, max_bytes=cfg.max_upload_bytes, read_timeout_s=cfg.read_timeout_s)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail), getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(ClientDisconnect)
    async def disconnected(request: Request, err: ClientDisconnect) -> JSONResponse:
        return error(400, "the client went away before its upload was complete")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return error(500, f"{type(err).__name__}: {err}".splitlines()[0])

    async def infer(key: tuple, file: UploadFile) -> tuple[Any, dict[str, Any]]:
        """Decode ``file`` off the event loop, then wait for its batch: (model input, result)."""
        with batcher.coming():  # a batch's window waits for this request while it is decoded
            data = await file.read()
            try:
                image = await run_in_threadpool(served.decode, data, file.filename or "upload")
            except NotAnImage as err:
                raise HTTPException(415, str(err)) from None
            except ValueError as err:
                raise HTTPException(422, str(err)) from None
        try:
            return image, await batcher.submit(key, image, cfg.timeout_s)
        except QueueFull as err:
            raise HTTPException(503, f"the server is busy: {err}; retry in {RETRY_AFTER_S} s",
                                headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except TimeoutError:
            raise HTTPException(504, f"no answer within {cfg.timeout_s:g} s (vitlab serve --timeout-s)") from None

    def top_k(k: int | None) -> int:
        return k or cfg.top_k

    @app.post("/v1/predict", summary="top-k class names and probabilities of an uploaded image")
    async def predict(file: UploadFile = File(..., description="an image: JPEG, PNG, WebP or BMP"),
                      k: int | None = Query(None, ge=1, description="how many classes (default --top-k)")) -> dict:
        _, result = await infer(PREDICT, file)
        return {"model": name, "predictions": served.top_k(result["probs"], top_k(k))}

    @app.post("/v1/attention", summary="attention rollout and every layer's per-head maps of an uploaded image")
    async def attention(file: UploadFile = File(..., description="an image: JPEG, PNG, WebP or BMP"),
                        k: int | None = Query(None, ge=1, description="how many classes (default --top-k)"),
                        format: Literal["png", "array"] = Query(
                            "png", description="png: overlays on the model's input as base64 PNG data URLs; "
                                               "array: the maps as nested lists (rows x cols)"),
                        layer: int | None = Query(None, description="only this layer's heads (-1: the last); "
                                                                    "default every layer"),
                        head_fusion: Literal["mean", "max", "min"] = Query("mean", description="rollout over heads"),
                        discard_ratio: float = Query(0.0, ge=0.0, lt=1.0,
                                                     description="rollout: drop this fraction of the lowest weights"),
                        ) -> dict:
        if not served.attention:
            raise HTTPException(409, f"{name} has no attention layers; use /v1/predict")
        layers = len(served.attention)
        if layer is not None and not -layers <= layer < layers:
            raise HTTPException(422, f"layer {layer} is out of range for {layers} layers; use 0..{layers - 1} or -1")
        image, result = await infer(("attention", head_fusion, discard_ratio), file)
        rgb = served.rgb(image)
        chosen = list(range(layers)) if layer is None else [layer % layers]
        if format == "png":
            encode = lambda heat: png_data_url(overlay(rgb, heat))  # noqa: E731
        else:
            encode = lambda heat: [[round(v, 6) for v in row] for row in heat.tolist()]  # noqa: E731
        heads = await run_in_threadpool(lambda: [[encode(h) for h in result["heads"][i]] for i in chosen])
        return {"model": name, "predictions": served.top_k(result["probs"], top_k(k)),
                "grid": list(result["rollout"].shape), "layers": chosen, "image": png_data_url(rgb),
                "rollout": encode(result["rollout"]), "heads": heads}

    @app.get("/v1/model", summary="the model card: name, parameters, resolution, labels, recorded accuracy")
    async def model() -> dict:
        return served.info()

    @app.get("/v1/posemb.png", summary="position-embedding similarity (paper Fig. 7 centre)",
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def posemb() -> Response:
        if not served.has_posemb:
            raise HTTPException(404, f"{name} has no learned position embeddings")
        return Response(await run_in_threadpool(served.posemb_png), media_type="image/png")

    @app.get("/healthz", summary="liveness, with the batcher's queue")
    async def healthz() -> dict:
        return {"status": "ok", "model": name, "queued": batcher.pending, "batches": batcher.batches,
                "items": batcher.items}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port); a port in use is one ValueError.

    Its protocol is named (IPPROTO_TCP), not left 0: asyncio sets TCP_NODELAY only on connections of
    such a socket, and without it every keep-alive request waited ~40 ms (Nagle against delayed ACK)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror or err}; pass another --port "
                         f"or --host") from None
    return sock


def run_server(loaded: LoadedModel, cfg: ServeConfig = ServeConfig(), *, name: str = "model",
               log: Any = print) -> None:
    """Listen on ``cfg.host:cfg.port`` (a port in use is one ValueError), log the URL, serve until Ctrl-C."""
    import uvicorn

    sock = listen_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    host = f"[{cfg.host}]" if sock.family == socket.AF_INET6 else cfg.host
    log(f"serving {name} at http://{host}:{port}/ (API docs: http://{host}:{port}/docs); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, cfg, name=name), access_log=cfg.access_log,
                                           log_level="info", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
