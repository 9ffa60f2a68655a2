"""A real headless browser for the tests: Debian's `chromium`, driven by Selenium through
Debian's own `chromedriver` (`.ci/run` installs both; Selenium Manager never downloads
anything), with downloads landing in a directory the test owns and screenshots kept as
artifacts in `$BETRACE_SCREENSHOTS`, else `build/ui-screenshots/` of the repository.

    browser = Browser(tmp_path / "downloads")
    try:
        browser.get(url)
        browser.screenshot("signals")
    finally:
        browser.close()
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from processes import missing
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parent.parent
WAIT = 30.0  # seconds: the longest any explicit wait of a test may take
ARGUMENTS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
             "--window-size=1400,1000")


def screenshot_dir() -> Path:
    """Where screenshots go (created): $BETRACE_SCREENSHOTS, else build/ui-screenshots/."""
    folder = Path(os.environ.get("BETRACE_SCREENSHOTS") or REPO / "build" / "ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Browser:
    """One headless Chromium session; `driver` is Selenium's WebDriver for everything else.
    A missing chromium or chromedriver fails the test in CI and skips it elsewhere."""

    def __init__(self, downloads: Path) -> None:
        if not all(os.access(binary, os.X_OK) for binary in (CHROMIUM, CHROMEDRIVER)):
            missing(f"{CHROMIUM} or {CHROMEDRIVER}", "chromium chromium-driver")
        self.downloads = downloads
        downloads.mkdir(parents=True, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in ARGUMENTS:
            options.add_argument(argument)
        options.add_experimental_option("prefs", {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "profile.default_content_setting_values.automatic_downloads": 1})
        try:
            self.driver = webdriver.Chrome(
                options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        except WebDriverException as exc:
            raise AssertionError(f"headless chromium did not start: {exc.msg}") from None
        self.driver.set_page_load_timeout(WAIT)

    def close(self) -> None:
        try:
            self.driver.quit()
        except WebDriverException:
            pass  # (the browser is gone already; quit stops chromedriver regardless)

    # -- driving -------------------------------------------------------------------------------

    def get(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
        """WebDriverWait(timeout).until(condition), failing with `what` (and the page's URL)."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(condition)
        except TimeoutException:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} "
                                 f"(at {self.driver.current_url})") from None

    def submit(self, button: WebElement, what: str = "the next page") -> None:
        """Click `button` (or a link) and wait until the browser has loaded another page."""
        page = self.driver.find_element("tag name", "html")
        button.click()
        self.wait(lambda _: _stale(page) and self.driver.execute_script(
            "return document.readyState") == "complete", what)

    def download(self, click: Callable[[], object], timeout: float = WAIT) -> Path:
        """Do `click`, then wait for the one new file it downloads, complete, and return it."""
        before = set(self.downloads.iterdir())

        def arrived(_: Any) -> Path | None:
            new = [p for p in self.downloads.iterdir() if p not in before]
            done = [p for p in new if not p.name.endswith((".crdownload", ".tmp"))
                    and not p.name.startswith(".")]
            partial = [p for p in new if p not in done]
            return done[0] if len(done) == 1 and not partial else None

        click()
        return self.wait(arrived, f"a download into {self.downloads}", timeout)

    # -- artifacts -----------------------------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        """The whole page, also what lies below the window, as `name` (.png added if missing)
        in screenshot_dir()."""
        path = screenshot_dir() / (name if name.endswith(".png") else f"{name}.png")
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                     "scale": 1}})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def _stale(element: WebElement) -> bool:
    """The element belongs to a page the browser has left."""
    try:
        element.is_enabled()
    except WebDriverException:  # StaleElementReferenceException, or the page is being replaced
        return True
    return False

