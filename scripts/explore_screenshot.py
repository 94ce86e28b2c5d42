"""A screenshot of the explorer page in Debian's headless Chromium (how docs/explore.png is made).

Start an orchestrator and ``recsys explore`` first, then::

    python scripts/explore_screenshot.py "http://127.0.0.1:8080/?user=42&similar=50" docs/explore.png

It waits until the recommendations, the similar and the popular panels have answered, grows
the window to the page's height and saves a PNG. ``tests/test_explore.py`` starts its browser
with :func:`start_chromium` too. Needs ``chromium`` and ``chromium-driver`` (Debian) and
selenium (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1440,1000",
)
"""Headless, no sandbox (root in a container), and nothing that reaches the internet."""


def missing_browser() -> str | None:
    """Why no browser can be started here, or None when chromium and chromedriver are installed."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[dev]')"
    if (shutil.which("chromium") or shutil.which("chromium-browser")) is None or shutil.which("chromedriver") is None:
        return "no chromium + chromedriver (Debian: apt-get install chromium chromium-driver; `make test` does it as root)"
    return None


def start_chromium(profile_dir: str | Path) -> Any:
    """A selenium Chrome driver on Debian's Chromium, with a fresh profile in ``profile_dir``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    # the driver's path is given: selenium must not try to download one (no internet here)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_page_load_timeout(60)
    return driver


def screenshot(driver: Any, url: str, out: str | Path, width: int = 1440, timeout_s: float = 60.0) -> Path:
    """Opens ``url``, waits for every panel with a question to answer, saves the whole page as PNG."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    panels = ("recs-panel", "similar-panel", "popular-panel")
    WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
        lambda d: (
            all(d.find_element("id", p).get_attribute("data-state") in ("ready", "error", "idle") for p in panels)
            and d.find_element("id", "popular-panel").get_attribute("data-state") != "idle"
        ),
        message="the panels did not answer",
    )
    driver.set_window_size(width, driver.execute_script("return document.documentElement.scrollHeight") + 140)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(out)):
        raise RuntimeError(f"chromium could not write {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the explorer page, e.g. http://127.0.0.1:8080/?user=42")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--width", type=int, default=1440)
    args = parser.parse_args(argv)
    why = missing_browser()
    if why:
        print(f"explore_screenshot: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        driver = start_chromium(profile)
        try:
            print(screenshot(driver, args.url, args.out, args.width))
        finally:
            driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
