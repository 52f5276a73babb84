"""A user's journey through the Airflow UI in a real browser (Playwright driving Debian's chromium, headless):
log in, trigger from a DAG's trigger form, follow the run, open a task's extra link to its job page.

Screenshots of every step go to ``shots`` (the test's output folder)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str:
    """Debian's chromium (scripts/test.sh installs it when absent), or '' when it is not installed."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), "")


class Journey:
    def __init__(self, page: Any, base_url: str, shots: Path) -> None:
        self.page = page
        self.base = base_url
        self.shots = shots
        self.count = 0
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}_{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def log_in(self, username: str, password: str) -> None:
        self.page.goto(self.base + "/", wait_until="networkidle")
        self.shot("login")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        self.page.click("button:has-text('Sign in')")
        self.page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)

    def open_trigger_form(self, dag_id: str) -> Any:
        self.page.goto(f"{self.base}/dags/{dag_id}", wait_until="networkidle")
        self.page.get_by_role("button", name="Trigger").first.click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(f"Trigger Dag - {dag_id}").wait_for()
        return dialog

    def fill_form(self, dialog: Any, fields: Dict[str, str], overrides: str) -> None:
        """Text fields by param name (``element_<name>``, in their collapsed sections), and the JSON editor of
        ``spec_overrides`` (section Advanced), typed as a user pastes it."""
        self.open_section(dialog, "Dataset", "[id='element_train_datasets']")  # one section open at a time
        for name, value in fields.items():
            dialog.locator(f"[id='element_{name}']").fill(value)
        self.open_section(dialog, "Advanced", ".monaco-editor")
        editor = dialog.locator(".monaco-editor").first
        editor.click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.press("Delete")
        self.page.keyboard.insert_text(overrides)

    def open_section(self, dialog: Any, section: str, inside: str) -> None:
        toggle = dialog.get_by_role("button", name=section, exact=True)
        toggle.wait_for(state="visible")
        if toggle.get_attribute("aria-expanded") != "true":
            toggle.click()
        dialog.locator(inside).first.wait_for(state="visible")

    def submit(self, dialog: Any) -> None:
        dialog.get_by_role("button", name="Trigger", exact=True).last.click()

    def open_extra_link(self, dag_id: str, run_id: str, task_id: str, name: str) -> str:
        """Open a task instance's page, its Details tab (where the UI lists the extra links as buttons) and click
        the button ``name``; returns the button's href. A link to another origin opens a new tab: the journey
        goes on there."""
        self.page.goto(f"{self.base}/dags/{dag_id}/runs/{run_id}/tasks/{task_id}", wait_until="networkidle")
        self.page.locator(f"a[href$='/tasks/{task_id}/details']", has_text="Details").first.click()
        button = self.page.get_by_role("link", name=name, exact=True)
        button.wait_for(timeout=30_000)
        self.shot("task_details_extra_links")
        href = button.get_attribute("href")
        if button.get_attribute("target") == "_blank":
            with self.page.context.expect_page() as opened:
                button.click()
            self.page = opened.value
        else:
            button.click()
        self.page.wait_for_url(lambda url: url == href, timeout=30_000)
        self.page.wait_for_load_state("networkidle")
        return href

    def wait_text(self, pattern: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.page.locator("body").inner_text()
            if re.search(pattern, text):
                return text
            time.sleep(0.5)
        raise AssertionError(f"{pattern!r} not on the page after {timeout} s: {text[-2000:]}")

    def until(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            time.sleep(1)
