"""Render a local HTML file in headless Chromium for report tests.

``render_page`` opens the file and returns what a test needs to check:
console errors, the page's images, the requests it made, its title and
whether its in-page links resolve. It can also save a full-page PNG
screenshot. Only the standard library is used. Chromium is driven over
the Chrome DevTools Protocol (CDP) with ``--remote-debugging-pipe``:
Chromium reads JSON commands, each ending in a NUL byte, from fd 3 and
writes replies and events the same way to fd 4. A reader thread puts the
messages on a queue, so every wait has a deadline and nothing can hang.
Tests should skip when ``CHROMIUM`` is None.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


CHROMIUM: str | None = _find_chromium()

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]
_MAX_HEIGHT = 20000

# Every <img> and outermost inline <svg>, with rendered and natural sizes.
_IMAGES_JS = """
Array.from(document.querySelectorAll('img, svg'))
  .filter(e => e.tagName.toLowerCase() !== 'svg' || !e.ownerSVGElement)
  .map(e => {
    const r = e.getBoundingClientRect();
    const img = e.tagName.toLowerCase() === 'img';
    return {id: e.id || '', alt: e.getAttribute('alt') || '',
            tag: e.tagName.toLowerCase(), width: r.width, height: r.height,
            natural_width: img ? e.naturalWidth : r.width,
            natural_height: img ? e.naturalHeight : r.height,
            complete: img ? e.complete : true};
  })
"""
_READY_JS = (
    "document.readyState === 'complete' && "
    "Array.from(document.images).every(i => i.complete)"
)
# null without in-page links, else whether every href="#x" has a target.
_ANCHORS_JS = """
(() => {
  const links = Array.from(document.querySelectorAll('a[href^="#"]'))
    .map(a => decodeURIComponent(a.getAttribute('href').slice(1)))
    .filter(id => id);
  if (!links.length) return null;
  return links.every(id => document.getElementById(id) ||
                           document.getElementsByName(id).length);
})()
"""
_HEIGHT_JS = (
    "Math.ceil(Math.max(document.documentElement.scrollHeight, "
    "document.body ? document.body.scrollHeight : 0))"
)


@dataclass
class PageRender:
    console_errors: list[str]
    images: list[dict]
    requests: list[str]
    title: str
    anchors_ok: bool | None = None


class _Cdp:
    """One Chromium process and its CDP pipe; events are kept in ``events``."""

    def __init__(self, binary: str, profile: str, deadline: float):
        self.deadline = deadline
        self.events: list[dict] = []
        self._next_id = 0
        self._queue: queue.Queue = queue.Queue()
        self._stderr = open(os.path.join(profile, "stderr.log"), "w+b")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # Move the child's ends above fd 10 so dup2 onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_child_r)
        os.close(from_child_w)

        def _fds_3_and_4():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        try:
            self.proc = subprocess.Popen(
                [binary, *_FLAGS, f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr, pass_fds=(3, 4),
                preexec_fn=_fds_3_and_4, start_new_session=True,
            )
        finally:
            os.close(child_r)
            os.close(child_w)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self._queue.put(None)
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                self._queue.put(json.loads(raw))

    def fail(self, what: str) -> RuntimeError:
        self._stderr.flush()
        self._stderr.seek(0)
        tail = self._stderr.read().decode(errors="replace")[-3000:]
        return RuntimeError(f"headless Chromium: {what}\n--- chromium stderr (tail) ---\n{tail}")

    def _next(self, until: float) -> dict:
        """Next message from Chromium; raises if it died or ``until`` passed."""
        left = min(until, self.deadline) - time.monotonic()
        try:
            msg = self._queue.get(timeout=max(left, 0.001))
        except queue.Empty:
            raise TimeoutError from None
        if msg is None:
            self._queue.put(None)
            try:
                code = self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                code = None
            raise self.fail(f"pipe closed (exit code {code})")
        return msg

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        try:
            os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        except OSError as exc:
            raise self.fail(f"cannot send {method}: {exc}") from None
        while True:
            try:
                reply = self._next(self.deadline)
            except TimeoutError:
                raise self.fail(f"timed out waiting for {method}") from None
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise self.fail(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            try:
                msg = self._next(self.deadline)
            except TimeoutError:
                raise self.fail(f"timed out waiting for {method}") from None
            if "method" in msg:
                self.events.append(msg)
                if msg["method"] == method:
                    return msg

    def drain(self, seconds: float) -> None:
        """Collect events arriving within ``seconds``."""
        until = time.monotonic() + seconds
        while True:
            try:
                msg = self._next(until)
            except TimeoutError:
                return
            if "method" in msg:
                self.events.append(msg)

    def close(self) -> None:
        try:
            os.write(self._to_child, b'{"id": 0, "method": "Browser.close"}\0')
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)
        self._stderr.close()


def _evaluate(cdp: _Cdp, session: str, expression: str):
    result = cdp.send("Runtime.evaluate",
                      {"expression": expression, "returnByValue": True}, session)
    if "exceptionDetails" in result:
        raise cdp.fail(f"page script failed: {result['exceptionDetails']}")
    return result["result"].get("value")


def _console_text(args: list[dict]) -> str:
    return " ".join(str(a.get("value", a.get("description", a.get("type", "")))) for a in args)


def _errors(events: list[dict]) -> list[str]:
    errors = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(f"console.{params['type']}: {_console_text(params.get('args', []))}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            errors.append(f"uncaught: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            where = f" {entry['url']}" if entry.get("url") else ""
            errors.append(f"log.{entry.get('source', '')}: {entry.get('text', '')}{where}")
    return errors


def render_page(
    html_path, screenshot_path=None, width: int = 1280, timeout: float = 60.0
) -> PageRender:
    """Load ``html_path`` in headless Chromium and report what it did.

    ``requests`` lists every URL the page asked for other than itself
    (``data:`` and ``blob:`` URLs are not requests and are left out).
    """
    if CHROMIUM is None:
        raise RuntimeError("no chromium, chromium-browser or google-chrome found")
    url = Path(html_path).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="render-page-")
    cdp = None
    try:
        cdp = _Cdp(CHROMIUM, profile, time.monotonic() + timeout)
        target = cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        attach = {"targetId": target, "flatten": True}
        session = cdp.send("Target.attachToTarget", attach)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.send(f"{domain}.enable", {}, session)
        metrics = {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": False}
        cdp.send("Emulation.setDeviceMetricsOverride", metrics, session)
        cdp.events.clear()  # drop about:blank's events
        nav = cdp.send("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            raise cdp.fail(f"cannot open {url}: {nav['errorText']}")
        cdp.wait_event("Page.loadEventFired")
        settle_until = min(cdp.deadline, time.monotonic() + 10)
        while not _evaluate(cdp, session, _READY_JS) and time.monotonic() < settle_until:
            cdp.drain(0.05)
        cdp.drain(0.2)  # late console and log events

        images = _evaluate(cdp, session, _IMAGES_JS)
        title = _evaluate(cdp, session, "document.title")
        anchors_ok = _evaluate(cdp, session, _ANCHORS_JS)
        if screenshot_path is not None:
            height = min(max(int(_evaluate(cdp, session, _HEIGHT_JS)), 1), _MAX_HEIGHT)
            cdp.send("Emulation.setDeviceMetricsOverride", {**metrics, "height": height}, session)
            shot = cdp.send("Page.captureScreenshot",
                            {"format": "png", "captureBeyondViewport": True}, session)
            Path(screenshot_path).write_bytes(base64.b64decode(shot["data"]))

        requests = [
            e["params"]["request"]["url"] for e in cdp.events
            if e["method"] == "Network.requestWillBeSent"
            and e["params"]["request"]["url"] != url
            and not e["params"]["request"]["url"].startswith(("data:", "blob:"))
        ]
        return PageRender(console_errors=_errors(cdp.events), images=images,
                          requests=requests, title=title, anchors_ok=anchors_ok)
    finally:
        if cdp is not None:
            cdp.close()
        shutil.rmtree(profile, ignore_errors=True)
