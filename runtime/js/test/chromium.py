"""Drive headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: no port,
no network), for the browser demo test (tests/test_js.py) and bench.py. Serves folders over HTTP on
127.0.0.1 only."""

from __future__ import annotations

import base64
import fcntl
import functools
import http.server
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

CHROMIUM = os.environ.get("RESSFORMER_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1000,760", "--remote-debugging-pipe"]


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                      ".onnx": "application/octet-stream", ".json": "application/json"}

    def log_message(self, *args):
        pass


class Server:
    """Serve `mounts` ({url prefix: folder}) on 127.0.0.1 through one temp folder of symlinks."""

    def __init__(self, mounts: dict[str, Path]):
        self.root = tempfile.TemporaryDirectory()
        for name, folder in mounts.items():
            os.symlink(Path(folder).resolve(), Path(self.root.name) / name)
        handler = functools.partial(_Handler, directory=self.root.name)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.root.cleanup()


def _high(fd: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return new


class Chromium:
    """One headless Chromium and one page, spoken to with DevTools protocol messages on fds 3/4."""

    def __init__(self):
        if not Path(CHROMIUM).exists():
            raise FileNotFoundError(f"{CHROMIUM} not found: install Chromium (apt-get install -y chromium) "
                                    "or set RESSFORMER_CHROMIUM")
        self.profile = tempfile.TemporaryDirectory()
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends move above 9 so that bash's `3<&N 4>&M` cannot clobber them
        to_chrome_r, from_chrome_w = (_high(fd) for fd in (to_chrome_r, from_chrome_w))
        cmd = " ".join([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile.name}", "about:blank"])
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {cmd} 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-"],
            pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf, self._id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (code {self.proc.poll()}) during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def page(self, method: str, **params) -> dict:
        return self.call(method, self.session, **params)

    def evaluate(self, expression: str):
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def run_demo(self, url: str, timeout: float = 300, again: bool = False) -> dict:
        """Open the demo at `url` (with auto=1) and wait for its result JSON; again: run the open page's
        form once more instead (the model stays loaded)."""
        if again:
            self.evaluate("delete document.body.dataset.done; document.getElementById('form').requestSubmit()")
        else:
            self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate("document.body && document.body.dataset.done || ''"):
                return json.loads(self.evaluate("document.getElementById('result').textContent"))
            time.sleep(0.2)
        raise TimeoutError(f"the demo did not finish in {timeout} s; status: "
                           f"{self.evaluate('document.getElementById(`status`).textContent')!r}")

    def screenshot(self, path: Path):
        data = self.page("Page.captureScreenshot", format="png")["data"]
        tmp = Path(path).with_suffix(".tmp.png")
        tmp.write_bytes(base64.b64decode(data))
        tmp.replace(path)

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.profile.cleanup()
