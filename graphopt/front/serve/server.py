"""Run the HTTP app on uvicorn and, with a gRPC port, the gRPC service beside it.

``Server(...).run()`` blocks until SIGINT/SIGTERM: the listening sockets close first (new connections
are refused), requests in flight are answered (up to ``drain_s``), then the model workers stop.
``start()``/``stop()`` run it on a background thread instead (tests, embedding).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading

import uvicorn

from graphopt.core.errors import UsageError
from graphopt.front.serve.app import make_app
from graphopt.front.serve.repository import Repository


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """Stops the gRPC server (no new calls, calls in flight finish) when HTTP starts to drain; a
    SIGINT/SIGTERM it drained for is not raised again afterwards (a drained stop is a clean exit)."""

    grpc_server = None
    drain_s = 30.0

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        stopped = self.grpc_server.stop(self.drain_s) if self.grpc_server is not None else None
        await super().shutdown(sockets)
        if stopped is not None:
            await asyncio.to_thread(stopped.wait, self.drain_s)


class Server:
    def __init__(self, repo: Repository, *, host: str = "127.0.0.1", port: int = 8000, grpc_port: int | None = None,
                 max_body_bytes: int = 64 << 20, drain_s: float = 30.0) -> None:
        self.repo, self.host = repo, host
        self._sock = listen(host, port)
        self.port = self._sock.getsockname()[1]
        self.grpc_port, grpc_server = None, None
        if grpc_port is not None:
            from graphopt.front.serve.grpc_service import make_grpc_server

            where = f"[{host}]" if ":" in host else host
            try:
                grpc_server, self.grpc_port = make_grpc_server(repo, f"{where}:{grpc_port}",
                                                               max_message_bytes=max_body_bytes)
            except OSError as e:
                self._sock.close()
                raise UsageError(f"--host {host} --grpc-port {grpc_port}: cannot listen ({e})") from None
        config = uvicorn.Config(make_app(repo, max_body_bytes=max_body_bytes), log_level="warning",
                                access_log=False, timeout_keep_alive=30, timeout_graceful_shutdown=drain_s,
                                lifespan="off")
        self._uvicorn = _Uvicorn(config)
        self._uvicorn.grpc_server, self._uvicorn.drain_s = grpc_server, drain_s
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        grpc_server = self._uvicorn.grpc_server
        try:
            if grpc_server is not None:
                grpc_server.start()
            self._uvicorn.run(sockets=[self._sock])
        finally:
            if grpc_server is not None:
                grpc_server.stop(0)
            self._sock.close()
            self.repo.close()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.run, name="graphopt-serve", daemon=True)
        self._thread.start()
        while not self._uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
