"""A loopback HTTP server for the download tests: files served from memory or a folder, with
Range requests, a "cut mid-file" mode, forced statuses, a slow mode and a log of every request.

    with LoopbackServer({"a.tar": data}) as server:
        server.url("a.tar")                 # http://127.0.0.1:<ephemeral port>/a.tar
        server.cut["a.tar"] = 1000          # the next answer for a.tar stops after 1000 bytes
        server.status["/gone/a.tar"] = 404  # a path that answers a status
        server.log                          # [Request(path, range, status, sent), ...]

Binds 127.0.0.1 on an ephemeral port, in a thread; stopped when the ``with`` block ends.
``routes`` maps a path (without the query) to ``route(request_handler, method) -> bool`` for
anything else (a login page); it answers with ``reply`` or ``serve_bytes``; returning False
falls through to the files.
"""
import dataclasses
import http.server
import os
import threading
import time


@dataclasses.dataclass
class Request:
    method: str
    path: str
    range: str      # the Range header, "" when none
    status: int
    sent: int       # body bytes written
    headers: dict


class LoopbackServer:
    def __init__(self, files=None, folder=None, delay=0.0):
        self.files = dict(files or {})   # name (path without the leading /) -> bytes
        self.folder = folder             # files are also looked up here by name
        self.cut = {}                    # name -> bytes sent before the connection is closed
        self.status = {}                 # path -> status code
        self.routes = {}                 # path -> route(request_handler, method) -> bool
        self.delay = delay               # seconds between 64 KiB chunks (overlapping clients)
        self.log = []
        self._lock = threading.Lock()
        self._httpd = None
        self._thread = None

    # ------------------------------------------------------------------ life
    def __enter__(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server._serve(self, "GET")

            def do_POST(self):
                server._serve(self, "POST")

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass   # a client that hangs up mid-answer (the cut mode, a refused download)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.address = self._httpd.server_address[:2]   # kept after stop(): URLs stay valid
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    @property
    def base(self):
        host, port = self.address
        return f"http://{host}:{port}"

    def url(self, name):
        return f"{self.base}/{name.lstrip('/')}"

    def requests_for(self, name, method="GET"):
        path = "/" + name.lstrip("/")
        return [r for r in self.log if r.path == path and r.method == method]

    # ------------------------------------------------------------------ serving
    def _record(self, handler, method, status, sent):
        with self._lock:
            self.log.append(Request(method, handler.path.split("?")[0],
                                    handler.headers.get("Range", ""), status, sent,
                                    dict(handler.headers)))

    def _data(self, name):
        if name in self.files:
            return self.files[name]
        if self.folder and os.path.isfile(os.path.join(self.folder, name)):
            with open(os.path.join(self.folder, name), "rb") as f:
                return f.read()
        return None

    def reply(self, handler, method, status, body=b"", headers=()):
        """A whole answer (for routes)."""
        self._reply(handler, method, status, body, headers)

    def _reply(self, handler, method, status, body=b"", headers=()):
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        self._record(handler, method, status, len(body))

    def _serve(self, handler, method):
        path = handler.path.split("?")[0]
        if path in self.routes and self.routes[path](handler, method):
            return
        if path in self.status:
            return self._reply(handler, method, self.status[path], b"no")
        name = path.lstrip("/")
        data = self._data(name)
        if data is None:
            return self._reply(handler, method, 404, b"not found")
        self.serve_bytes(handler, method, name, data)

    def serve_bytes(self, handler, method, name, data):
        """Answer with ``data`` as a file called ``name``: Range requests, the cut mode."""
        start, status, headers = 0, 200, [("Accept-Ranges", "bytes")]
        asked = handler.headers.get("Range", "")
        if asked.startswith("bytes=") and asked.endswith("-"):
            start = int(asked[len("bytes="):-1])
            if start >= len(data):
                return self._reply(handler, method, 416, b"",
                                   [("Content-Range", f"bytes */{len(data)}")])
            status = 206
            headers.append(("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"))
        body = data[start:]
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        with self._lock:
            cut = self.cut.pop(name, None)
        limit = len(body) if cut is None else min(cut, len(body))
        sent = 0
        while sent < limit:
            piece = body[sent:min(limit, sent + 65536)]
            handler.wfile.write(piece)
            handler.wfile.flush()
            sent += len(piece)
            if self.delay:
                time.sleep(self.delay)
        self._record(handler, method, status, sent)
        if cut is not None:
            handler.close_connection = True
