"""The server's options: one frozen dataclass (the ``vitlab serve`` options derive from it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import check_numbers


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """How ``vitlab serve`` listens, batches and refuses."""

    host: str = "127.0.0.1"  # the address to bind (0.0.0.0: every interface)
    port: int = 8000  # the TCP port
    max_batch: int = 16  # most images in one forward pass (1: no dynamic batching)
    batch_window_ms: float = 5.0  # how long a batch's first request waits for others being decoded to join it
    max_queue: int = 64  # requests waiting for the model; one more is answered 503 with Retry-After
    timeout_s: float = 30.0  # a request not answered in this time gets 504
    max_upload_mb: float = 10.0  # a larger upload gets 413
    read_timeout_s: float = 10.0  # a client that pauses longer than this while uploading gets 408
    top_k: int = 5  # classes returned when a request gives no k
    access_log: bool = True  # log one line per request

    def __post_init__(self) -> None:
        check_numbers(self)
        for name, low in (("port", 0), ("max_batch", 1), ("max_queue", 1), ("top_k", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"invalid ServeConfig: {name} = {getattr(self, name)}; it must be >= {low}")
        if self.port > 65535:
            raise ValueError(f"invalid ServeConfig: port = {self.port}; use 0..65535")
        for name in ("timeout_s", "max_upload_mb", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid ServeConfig: {name} = {getattr(self, name)}; it must be > 0")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
