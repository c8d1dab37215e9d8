"""A real headless Chromium driven by Playwright, for the tests about what the UI shows and for
docs/screenshots.py. The browser is Debian's (`apt-get install -y chromium`); Playwright never
downloads one of its own."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

INSTALL_HINT = "no Chromium on this machine: install it with `sudo apt-get install -y chromium`"
# .ci/run sets it: there, a missing browser fails the UI test instead of skipping it.
REQUIRE_BROWSER = "PIPELINE_TESTS_REQUIRE_BROWSER"
# Chromium as root in a container, with no network beyond loopback: no sandbox, no GPU, and
# none of its background connections (refused here, many at a time).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The UI's "Join the Dagster community" dialog covers the page on a first visit; a browser
# that has dismissed it once stores this key.
NO_COMMUNITY_DIALOG = "window.localStorage.setItem('communityNux', '1')"


def chromium_path() -> str | None:
    """The Chromium to drive: $PIPELINE_TESTS_BROWSER, else the first one on PATH."""
    if explicit := os.environ.get("PIPELINE_TESTS_BROWSER"):
        return explicit
    return next(
        (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))),
        None,
    )


@contextmanager
def ui_page(executable: str, width: int = 1600, height: int = 1000) -> Iterator:
    """A fresh page (a new, empty profile) in headless Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=FLAGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(NO_COMMUNITY_DIALOG)
            yield context.new_page()
        finally:
            browser.close()


def graph_labels(page) -> list[str]:
    """The texts of the nodes drawn in the asset graph (names may be shortened in the middle,
    with an ellipsis, to fit a node)."""
    return [t.strip() for t in page.locator("svg foreignObject").all_text_contents() if t.strip()]


def drawn(name: str, labels: list[str]) -> bool:
    """Whether `name` is one of the labels, whole or shortened as the UI shortens it."""
    for label in labels:
        if label == name:
            return True
        head, ellipsis, tail = label.partition("…")
        if ellipsis and head and tail and name.startswith(head) and name.endswith(tail):
            return True
    return False
