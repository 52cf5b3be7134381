"""An operator starts a run from the Prefect UI: Deployments → host-model → Run → Custom run → a spec
from the dropdown, a revision typed in → Submit; the run reaches Completed on a worker and is listed
under its readable name (``<spec>@<revision>``). The custom-run forms of host-model, host-on-checkpoint
and checkpoint-watcher have plain fields: no "None" toggles, no ``Property is type "None"``. Headless
Chromium via Selenium, with Debian's browser and driver (nothing is downloaded).

The test acts as a person does on a slow machine: it waits for what it needs to be on screen and
clickable, gets toasts out of the way before it clicks (they stack in the bottom-right corner, over
the form's Submit button), and never clicks through an overlay. What the browser saw (toasts,
console, failed requests) and the server log go to the test's artifacts whatever the outcome.

Why a toast appears at all: the test bed's Prefect server keeps its database in SQLite. While two
workers, their flow runs' log batches and heartbeats write to it, a write can meet ``SQLITE_BUSY``
(in WAL mode a transaction whose snapshot went stale gets it at once, whatever the busy timeout), and
the server answers that request ``503 Service Unavailable`` ("retryable": Prefect's
``is_client_retryable_exception``). Prefect's Python client retries a 503 by itself; the UI does not:
it shows "Something went wrong trying to create a flow run" / "Oops. Something went wrong." and
stays on the form. That is the test bed's database, not nimflow's deployment or parameters (a
production server runs on PostgreSQL: docs/fleet.md), so the test presses Submit again, as a person
would, only while the API has no new run of host-model. Any other failed request (a 4xx, a 500) is a
real error and fails the test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimflow.testbed import TestbedError
from tests.conftest import unavailable
from tests.e2e.conftest import E2E, artifacts_dir, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.testbed]
UI_WAIT = 60  # seconds an element may take to appear (the UI loads its bundle and queries the API)
TOAST_WAIT = 30  # seconds a toast may stay up; Prefect's toasts close themselves after 5 s
TOAST = ".p-toast-container__toast"  # one toast of Prefect's design system (its message: .p-toast__message)

#: Failed requests that are not errors of the test bed's server: the browser's own favicon lookup (the
#: UI serves none) and requests to the internet, which this machine cannot reach.
BENIGN_FAILURES = ("/favicon.ico", "prefect.io", "githubusercontent.com", "github.com", "google", "gstatic")


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
    # The background-networking flags keep Chromium from reaching for Google's hosts, which this
    # machine's closed network refuses (and which load the browser for nothing).
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                     "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run"):
        options.add_argument(argument)
    # The console and the network log, read back into the artifacts.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths.driver))
    yield driver
    driver.quit()


class UiRecorder:
    """What the browser saw, kept across the test: toasts, console lines and failed requests."""

    def __init__(self, browser: Any, out: Path) -> None:
        self.browser = browser
        self.out = out
        self.toasts: list[str] = []
        self.console: list[dict[str, Any]] = []
        self.failed_requests: list[str] = []

    def collect(self) -> None:
        """Read the browser's logs since the last call (each entry is returned once) and the toasts up now."""

        for kind, text in _visible_toasts(self.browser):
            if text and f"[{kind}] {text}" not in self.toasts:
                self.toasts.append(f"[{kind}] {text}")
        self.console += self.browser.get_log("browser")
        for entry in self.browser.get_log("performance"):
            event = json.loads(entry["message"])["message"]
            params = event.get("params", {})
            if event.get("method") == "Network.responseReceived" and params["response"]["status"] >= 400:
                self.failed_requests.append(f"{params['response']['status']} {params['response']['url']}")
            elif event.get("method") == "Network.loadingFailed" and not params.get("canceled"):
                self.failed_requests.append(f"{params.get('errorText')} (request {params.get('requestId')})")

    def api_failures(self) -> list[str]:
        """Failed requests that are errors: the benign ones and the SQLite 503s (module docstring) left out."""
        return [r for r in self.failed_requests
                if not any(benign in r for benign in BENIGN_FAILURES) and not r.startswith("503 ")]

    def save(self, tag: str, e2e: E2E) -> None:
        """Screenshot, page, toasts, console, failed requests and the server log, under ``tag``."""
        self.collect()
        self.browser.save_screenshot(str(self.out / f"prefect-ui-{tag}.png"))
        (self.out / f"prefect-ui-{tag}.html").write_text(self.browser.page_source)
        (self.out / f"prefect-ui-{tag}.json").write_text(json.dumps({
            "url": self.browser.current_url, "toasts": self.toasts, "failed_requests": self.failed_requests,
            "console": self.console}, indent=2, default=str))
        (self.out / f"prefect-ui-{tag}-server.log").write_text(e2e.server_log(tail=None))

    def summary(self) -> str:
        console = [f"{c.get('level')}: {c.get('message')}" for c in self.console if c.get("level") in ("SEVERE", "WARNING")]
        return (f"toasts: {self.toasts}\nfailed requests: {self.failed_requests[-20:]}\n"
                f"console warnings/errors: {console[-20:]}")


#: Toasts are read and closed in one script each: a toast closes itself (or is closed) at any moment, and
#: an element found first and read after may be gone by then (StaleElementReferenceException).
_READ_TOASTS = """
return Array.from(document.querySelectorAll(arguments[0]))
  .filter(t => t.getClientRects().length > 0)
  .map(t => [t.querySelector('.p-toast__icon--error') ? 'error' : 'info', t.innerText.split(/\\s+/).join(' ').trim()]);
"""
_CLOSE_ERROR_TOASTS = """
document.querySelectorAll(arguments[0]).forEach(t => {
  const close = t.querySelector('.p-toast__icon--error') && t.querySelector('.p-toast__close-btn');
  if (close) close.click();
});
"""


def _visible_toasts(browser: Any) -> list[tuple[str, str]]:
    """(kind, text) of every toast on screen now, read at once."""
    return [(str(kind), str(text)) for kind, text in browser.execute_script(_READ_TOASTS, TOAST) or []]


def _toasts_gone(browser: Any) -> bool:
    return not _visible_toasts(browser)


def _clear_toasts(browser: Any, recorder: UiRecorder) -> None:
    """Read every toast into the recorder, then get them out of the way as a person would.

    Info toasts close themselves after 5 s: they are waited out. Error toasts stay until closed, so
    they are closed through their own close button, pressed by script: the button sits under the
    toast's countdown ring, which takes a pointer click (the ElementClickInterceptedException of
    issue 12), and a scripted press cannot land on anything but the button it names.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    recorder.collect()
    browser.execute_script(_CLOSE_ERROR_TOASTS, TOAST)
    WebDriverWait(browser, TOAST_WAIT).until(_toasts_gone, f"a toast stayed up: {recorder.toasts}")


def _click(browser: Any, recorder: UiRecorder, locator: tuple[str, str]) -> None:
    """Click what ``locator`` finds once it is clickable and no toast is up, as a person would.

    Toasts are read into the recorder and cleared first (:func:`_clear_toasts`); one that stays past
    ``TOAST_WAIT`` fails the test naming it. WebDriver's click refuses an element covered by anything
    else, so nothing is ever clicked through an overlay.
    """
    from selenium.common.exceptions import ElementClickInterceptedException
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    for _ in range(3):
        element = WebDriverWait(browser, UI_WAIT).until(ec.element_to_be_clickable(locator))
        _clear_toasts(browser, recorder)
        try:
            element.click()
            return
        except ElementClickInterceptedException:
            recorder.collect()  # something else came up over it meanwhile: wait for it, look again
    raise AssertionError(f"{locator} stayed covered by another element; {recorder.summary()}")


#: Deployments whose custom-run form is only looked at (host-model's is filled in and submitted).
FORMS_ONLY = ("host-on-checkpoint", "checkpoint-watcher")

#: What the UI's schema form shows for a parameter that may be null (Prefect UI's SchemaFormPropertyAnyOf
#: and SchemaFormPropertyNull): a button group of the union's types, one of them "None", and, while None
#: is chosen, the text `Property is type "None"`.
_NONE_TOGGLES = """
return {
  none_buttons: Array.from(document.querySelectorAll('[class*="schema-form-property-any-of"] button'))
    .filter(b => b.innerText.trim() === 'None').length,
  null_properties: document.querySelectorAll('.schema-form-property-null').length,
  none_text: document.body.innerText.includes('Property is type "None"'),
};
"""


def _assert_plain_form(browser: Any, e2e: E2E, deployment: str) -> None:
    """The custom-run form on screen has every parameter of ``deployment`` and shows no "None" toggle.

    Waits until each parameter's label (its title in the deployment's schema, as the UI reads it) is on
    screen, so the whole form has rendered before it is looked at.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    schema_of_form = e2e.deployment(deployment).parameter_openapi_schema
    definitions = schema_of_form.get("definitions", {})
    for key, schema in schema_of_form["properties"].items():
        # A grouped parameter (host_model's Overrides) is a $ref: its title is the definition's.
        referenced = definitions.get(str(schema.get("$ref", "")).rsplit("/", 1)[-1], {})
        title = schema.get("title") or referenced.get("title") or key
        WebDriverWait(browser, UI_WAIT).until(
            ec.presence_of_element_located((By.XPATH, _label(title))), f"{deployment}'s form shows no field titled {title!r}")
    browser.save_screenshot(str(artifacts_dir() / f"prefect-ui-form-{deployment}.png"))
    toggles = browser.execute_script(_NONE_TOGGLES)
    assert toggles == {"none_buttons": 0, "null_properties": 0, "none_text": False}, (
        f"{deployment}'s run form has None toggles: {toggles}")


def _label(title: str) -> str:
    """XPath of a form field's label: the UI adds ``(Optional)`` to the title of a parameter that is not required."""
    return (f"//span[contains(@class, 'schema-form-property__label')][normalize-space()={json.dumps(title)} "
            f"or normalize-space()={json.dumps(title + ' (Optional)')}]")


def _open_custom_run_form(browser: Any, recorder: UiRecorder, e2e: E2E, deployment: str) -> None:
    """The deployment's custom-run page (Run → Custom run), opened by its address."""
    browser.get(f"{e2e.ui_url}/deployments/deployment/{e2e.deployment(deployment).id}/run")
    recorder.collect()


def _listed_in_the_ui(browser: Any, e2e: E2E, run_name: str) -> bool:
    """The flow runs page lists a run named ``run_name`` (reloaded: the list refreshes on its own only slowly)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{e2e.ui_url}/runs")
    try:
        WebDriverWait(browser, UI_WAIT / 4).until(ec.presence_of_element_located(
            (By.XPATH, f"//a[normalize-space()={json.dumps(run_name)}]")))
    except TimeoutException:
        return False  # not listed yet: the caller polls again
    return True


def test_custom_run_from_the_ui_completes(e2e: E2E, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    spec_name = sorted(e2e.specs)[0]
    revision = e2e.hub_sha(spec_name)
    readable_name = f"{spec_name}@{revision[:7]}"  # nimflow.run_names, spelled out here
    wait = WebDriverWait(browser, UI_WAIT)
    recorder = UiRecorder(browser, artifacts_dir())
    try:
        # Plain fields in every run form. Failed on old main (checked by running this test with main's
        # flows/, nimflow/run_parameters.py and prefect.yaml): host-on-checkpoint's form had "None" toggles
        # for Revision and Fine-tuned checkpoint, each showing `Property is type "None"` ({'none_buttons': 2,
        # 'none_text': True, 'null_properties': 2}); the watcher's `specs` (anyOf array/null there) is not
        # reached then, tests/unit/test_parameter_forms.py shows it.
        for deployment in FORMS_ONLY:
            _open_custom_run_form(browser, recorder, e2e, deployment)
            _assert_plain_form(browser, e2e, deployment)

        browser.get(f"{e2e.ui_url}/deployments")
        _click(browser, recorder, (By.XPATH, "//a[contains(@href, '/deployments/deployment/')][normalize-space()='host-model']"))
        _click(browser, recorder, (By.XPATH, "//button[normalize-space()='Run']"))
        _click(browser, recorder, (By.XPATH, "//*[normalize-space()='Custom run']"))

        # The spec parameter is a dropdown of the spec names (its title is "Model").
        field = wait.until(ec.presence_of_element_located((By.XPATH,
            "//div[contains(@class, 'schema-form-property')]"
            "[.//span[contains(@class, 'schema-form-property__label')][normalize-space()='Model']]")))
        select = wait.until(lambda _: next((s for s in field.find_elements(By.TAG_NAME, "select") if s.is_displayed()), None))
        offered = sorted(o.text.strip() for o in Select(select).options if o.text.strip())
        assert offered == sorted(e2e.specs), f"the dropdown offers {offered}"
        Select(select).select_by_visible_text(spec_name)
        _assert_plain_form(browser, e2e, "host-model")
        # Revision is a plain text field (the UI's textarea for a string): typed into, no type to pick first.
        revision_field = wait.until(ec.element_to_be_clickable((By.XPATH,
            _label("Revision") + "/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]//textarea")))
        revision_field.send_keys(revision)
        run_name = browser.find_element(By.CSS_SELECTOR, ".flow-run-name-input input").get_attribute("value")
        assert run_name, "the form has no run name"
        browser.save_screenshot(str(recorder.out / "prefect-ui-custom-run-form.png"))
        # The run is found as the one new run of host-model: the flow renames it when it starts
        # (`<spec>@<revision>`, nimflow.run_names), so the form's name identifies it only until then.
        earlier = {r.id for r in e2e.flow_runs("host-model")}
        _submit(browser, recorder, e2e, earlier)
    except Exception as exc:
        recorder.save("failure", e2e)
        raise AssertionError(f"the UI run failed: {exc}\n{recorder.summary()}") from exc
    recorder.save("submitted", e2e)
    # No request of the UI failed but for the test bed's SQLite 503s: a 4xx or 500 here is a real
    # error of the deployment or its parameters (the UI shows it as a toast).
    assert recorder.api_failures() == [], recorder.summary()

    runs = wait_for(f"the UI's flow run (form name {run_name!r})",
                    lambda: [r for r in e2e.flow_runs("host-model") if r.id not in earlier], timeout=UI_WAIT)
    assert len(runs) == 1 and runs[0].parameters["spec"] == spec_name, runs
    assert runs[0].parameters["revision"] == revision, runs[0].parameters
    final = e2e.wait_final(runs[0].id)
    assert final.state.is_completed(), f"{final.state}\n{e2e.flow_logs(final.id)[-3000:]}\n{e2e.worker_logs()}"
    assert final.work_queue_name is not None
    record = e2e.record(final.id)
    assert record["endpoint"].startswith("http") and record["revision sha"] == revision
    # Listed under its readable name, not the form's random one: in the API and in the UI's run list.
    assert final.name == readable_name, final.name
    wait_for(f"the UI's run list to show {readable_name!r}", lambda: _listed_in_the_ui(browser, e2e, readable_name),
             timeout=UI_WAIT * 2, every=2.0)


def _submit(browser: Any, recorder: UiRecorder, e2e: E2E, earlier: set[Any], attempts: int = 3) -> None:
    """Press Submit until the UI creates the run, as an operator would.

    On success the UI leaves the form. When the server answers 503 (module docstring) the UI shows an
    error toast and stays on the form; the toast is recorded and closed before the next press
    (any other failure fails the test afterwards, through ``api_failures``). A press is repeated only
    while the API has no new run of host-model (none but the ``earlier`` ids), so a second press never
    makes a second run (the test asserts exactly one).
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def outcome(driver: Any) -> str | bool:
        if not driver.current_url.split("?")[0].endswith("/run"):
            return "left the form"
        if driver.find_elements(By.CSS_SELECTOR, ".p-toast__icon--error"):
            return "error toast"
        return False

    for _ in range(attempts):
        _click(browser, recorder, (By.XPATH, "//button[@type='submit'][normalize-space()='Submit']"))
        try:
            if WebDriverWait(browser, UI_WAIT / 2).until(outcome) == "left the form":
                return
        except TimeoutException:
            recorder.toasts.append(f"(no answer to Submit within {UI_WAIT / 2:g} s)")
        recorder.collect()
        if any(r.id not in earlier for r in e2e.flow_runs("host-model")):
            return  # the run exists although the UI did not move on; the test goes on with it
    raise AssertionError(f"the UI did not create the run in {attempts} presses\n"
                         f"--- Prefect server log ---\n{e2e.server_log()}")
