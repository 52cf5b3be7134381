"""An operator starts a run from the Prefect UI: Deployments → host-model → Run → Custom run → a spec
from the dropdown → Submit; the run reaches Completed on a worker. Headless Chromium via Selenium,
with Debian's browser and driver (nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from nimflow.testbed import TestbedError
from tests.conftest import unavailable
from tests.e2e.conftest import E2E, artifacts_dir, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]
UI_WAIT = 60  # seconds an element may take to appear (the UI loads its bundle and queries the API)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        unavailable(f"selenium is not installed (the testbed extra): {exc}")
    from nimflow.testbed.browser import ensure_chromium

    try:
        paths = ensure_chromium()
    except TestbedError as exc:
        unavailable(f"no Chromium: {exc}")
    options = Options()
    options.binary_location = paths.binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths.driver))
    yield driver
    driver.quit()


def test_custom_run_from_the_ui_completes(e2e: E2E, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    spec_name = sorted(e2e.specs)[0]
    wait = WebDriverWait(browser, UI_WAIT)
    out = artifacts_dir()
    try:
        browser.get(f"{e2e.ui_url}/deployments")
        wait.until(ec.element_to_be_clickable(
            (By.XPATH, "//a[contains(@href, '/deployments/deployment/')][normalize-space()='host-model']"))).click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Run']"))).click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space()='Custom run']"))).click()

        # The spec parameter is a dropdown of the spec names (its title is "Model").
        field = wait.until(ec.presence_of_element_located((By.XPATH,
            "//div[contains(@class, 'schema-form-property')]"
            "[.//span[contains(@class, 'schema-form-property__label')][normalize-space()='Model']]")))
        select = wait.until(lambda _: next((s for s in field.find_elements(By.TAG_NAME, "select") if s.is_displayed()), None))
        offered = sorted(o.text.strip() for o in Select(select).options if o.text.strip())
        assert offered == sorted(e2e.specs), f"the dropdown offers {offered}"
        Select(select).select_by_visible_text(spec_name)
        run_name = browser.find_element(By.CSS_SELECTOR, ".flow-run-name-input input").get_attribute("value")
        assert run_name, "the form has no run name"
        browser.save_screenshot(str(out / "prefect-ui-custom-run-form.png"))
        _submit(browser, e2e, run_name)
    except Exception:
        browser.save_screenshot(str(out / "prefect-ui-failure.png"))
        (out / "prefect-ui-failure.html").write_text(browser.page_source)
        raise

    runs = wait_for(f"the UI's flow run {run_name!r}",
                    lambda: [r for r in e2e.flow_runs("host-model") if r.name == run_name], timeout=UI_WAIT)
    assert len(runs) == 1 and runs[0].parameters["spec"] == spec_name, runs
    final = e2e.wait_final(runs[0].id)
    assert final.state.is_completed(), f"{final.state}\n{e2e.flow_logs(final.id)[-3000:]}\n{e2e.worker_logs()}"
    assert final.work_queue_name is not None
    record = e2e.record(final.id)
    assert record["endpoint"].startswith("http")


def _submit(browser: Any, e2e: E2E, run_name: str, attempts: int = 3) -> None:
    """Press Submit until the UI creates the run, as an operator would.

    On success the UI leaves the form. When the API refuses the request (the test bed's SQLite-backed
    server can answer 5xx while workers write) the UI shows an error toast and stays on the form; a
    press can also be lost while the form re-renders. The operator then presses again: here only while
    the API has no run of that name, so a second press never makes a second run (the test asserts
    exactly one). The toasts seen and the server log are in the failure.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    toasts: list[str] = []

    def outcome(driver: Any) -> str | bool:
        if not driver.current_url.split("?")[0].endswith("/run"):
            return "left the form"
        if driver.find_elements(By.CSS_SELECTOR, ".p-toast__icon--error"):
            return "error toast"
        return False

    for _ in range(attempts):
        WebDriverWait(browser, UI_WAIT).until(
            ec.element_to_be_clickable((By.XPATH, "//button[@type='submit'][normalize-space()='Submit']"))).click()
        try:
            if WebDriverWait(browser, UI_WAIT / 2).until(outcome) == "left the form":
                return
            toasts += [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".p-toast__message")]
            for close in browser.find_elements(By.CSS_SELECTOR, ".p-toast__close-btn"):
                close.click()
        except TimeoutException:
            toasts.append(f"(no answer to Submit within {UI_WAIT / 2:g} s)")
        if any(r.name == run_name for r in e2e.flow_runs("host-model")):
            return  # the run exists although the UI did not move on; the test goes on with it
    raise AssertionError(f"the UI did not create the run in {attempts} presses: {toasts}\n"
                         f"--- Prefect server log ---\n{e2e.server_log()}")
