"""A real headless Chromium for the report tests: Debian's /usr/bin/chromium driven by Playwright.

Never `playwright install`: it downloads its own browser. Playwright's Python package brings only
its driver; the browser is the system's (`.ci/run` installs it with apt when missing).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field

CHROMIUM = os.environ.get("CXR_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage"]


def available() -> str | None:
    """None when the browser tests can run, else why not."""
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]')"
    return None


@dataclass
class PageCheck:
    console: list = field(default_factory=list)  # (type, text) of every console message and page error
    requests_failed: list = field(default_factory=list)
    images: list = field(default_factory=list)  # {"src", "ok", "w"} for each <img>
    external: list = field(default_factory=list)  # requests that left file:// and data:


def open_page(browser, path, screenshot, *, width: int = 1280):
    """Load ``path`` from disk, wait for every image, screenshot the whole page; -> (page, PageCheck)."""
    check = PageCheck()
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.on("console", lambda m: check.console.append((m.type, m.text)))
    page.on("pageerror", lambda e: check.console.append(("pageerror", str(e))))
    page.on("requestfailed", lambda r: check.requests_failed.append(r.url))
    page.on("request", lambda r: check.external.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
    page.goto(f"file://{os.path.abspath(path)}", wait_until="load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    check.images = page.evaluate(
        "Array.from(document.images).map(i => ({src: i.src.slice(0, 80), ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth}))")
    page.screenshot(path=str(screenshot), full_page=True)
    return page, check
