"""The suite's one HTTP server on 127.0.0.1: a folder served as `python -m http.server` serves it
(Last-Modified, Content-Length, HEAD), or, while `script` holds behaviours, request i answered
by script[i] (the last one repeats): 503s, HTML sign-in pages, dropped or stalled bodies."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

Behaviour = Callable[["Handler"], None]


class Handler(SimpleHTTPRequestHandler):
    # Bounds how long a keep-alive handler thread waits, so that stopping cannot hang.
    timeout = 5
    server: Site

    def setup(self) -> None:
        self.protocol_version = self.server.protocol
        super().setup()

    def _answer(self, serve_file: Callable[[], None]) -> None:
        site = self.server
        site.requests.append(self.command)
        site.seen.append({"path": self.path, "range": self.headers.get("Range")})
        if not site.script:
            serve_file()
            return
        behaviour = site.script.pop(0) if len(site.script) > 1 else site.script[0]
        behaviour(self)

    def do_GET(self) -> None:
        self._answer(super().do_GET)

    def do_HEAD(self) -> None:
        self._answer(super().do_HEAD)

    def log_message(self, format: str, *args: object) -> None:
        pass


def send(handler: Handler, status: int, body: bytes, headers: dict[str, str]) -> None:
    """Answer with `status`, `headers` and `body` (no body to a HEAD)."""
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def answer(status: int, body: bytes, content_type: str = "text/plain") -> Behaviour:
    return lambda handler: send(handler, status, body, {"Content-Type": content_type})


# What `mode` names: a busy server, and a sign-in page in place of the file.
MODES = {
    "busy": answer(503, b"busy"),
    "html": answer(200, b"<html>Sign in to continue</html>", "text/html"),
}


class Site(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True

    def __init__(self, folder: Path, protocol: str = "HTTP/1.0") -> None:
        super().__init__(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.folder = folder
        self.protocol = protocol  # HTTP/1.1: keep-alive, as servers that resume downloads
        self.script: list[Behaviour] = []
        self.requests: list[str] = []  # the method of each request so far
        self.seen: list[dict[str, str | None]] = []  # the path and Range header of each
        self.release = threading.Event()  # stalled behaviours wait on it until the test ends

    def url(self, name: str = "data.zip") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name.lstrip('/')}"

    @property
    def mode(self) -> str:
        return next((name for name, b in MODES.items() if self.script == [b]), "normal")

    @mode.setter
    def mode(self, name: str) -> None:
        self.script = [] if name == "normal" else [MODES[name]]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # writes to sockets the client already dropped are expected here


@contextmanager
def serving(folder: Path, protocol: str = "HTTP/1.0") -> Iterator[Site]:
    """A Site on a free port for the block's duration, stopped with its handler threads."""
    folder.mkdir(parents=True, exist_ok=True)
    site = Site(folder, protocol)
    thread = threading.Thread(target=site.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield site
    finally:
        site.release.set()
        site.shutdown()
        site.server_close()  # joins the handler threads
        thread.join(timeout=5)
        assert not thread.is_alive()
