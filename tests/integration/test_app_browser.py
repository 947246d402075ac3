"""The clinician's app in a real browser: headless Chromium, the service under gunicorn, HAPI.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`); Selenium drives that
binary, so no browser is downloaded. The app is launched against the open HAPI server (the
fhirclient library's `fhirServiceUrl` development launch), reads the service's JSON view, and
writes through the service's `$dm-cancer-screening` operation. Screenshots and the render
figures are saved under tests/artifacts/ (gitignored); with `FHIR_DM_SCREENSHOTS=<directory>`
the documentation's screenshots (the card, the patient page and the clinic page at desktop and
phone width) are saved there too:

    FHIR_DM_SCREENSHOTS=docs/images python -m pytest \\
        tests/integration/test_app_browser.py -m integration

Every page is checked with axe-core (vendored in tests/vendor): no serious or critical
violation.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_dm.cds.prefetch import render
from fhir_dm.fhir.client import FhirClient
from fhir_dm.knowledge.load import load_knowledge
from tests import factories as f
from tests.integration.records import store
from tools.hapi_server import free_port

webdriver = pytest.importorskip("selenium.webdriver")
from PIL import Image  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.integration

NOW = "2024-09-15"  # the at-diagnosis round (due by 2024-06-01) is overdue
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
AXE = ROOT / "tests" / "vendor" / "axe-core-4.11.1.min.js"
CARD_VIEWER = Path(__file__).with_name("card_viewer.html")
# The documentation's screenshots go here when set (relative to the repository).
SCREENSHOTS = os.environ.get("FHIR_DM_SCREENSHOTS")
DESKTOP, PHONE = 1280, 375
# A documentation screenshot shows the top of a long page (the full page is in tests/artifacts).
DOC_SHOT_MAX_HEIGHT = 2400
START_TIMEOUT_S = 60.0
# The launch page redirects to the app page: an element read during that navigation is gone.
NAVIGATING = (StaleElementReferenceException, NoSuchElementException)
WAIT_S = 30.0
Json = dict[str, Any]
MR = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}
# The timeline as Chart.js holds it: bars (one per item), row labels, x range, today's line,
# and whether two neighbouring axis labels overlap (widths measured with the chart's font).
CHART_STATE = """
const c = Chart.getChart(document.getElementById('timeline'));
const bars = c.data.datasets.flatMap((d) => d.data.map((p) => ({status: d.status, test: p.y})));
const x = c.scales.x, ctx = c.ctx;
ctx.save(); ctx.font = '12px system-ui, sans-serif';
const ticks = x.ticks.map((t, i) => ({px: x.getPixelForTick(i),
  w: ctx.measureText(x.options.ticks.callback(t.value)).width}));
ctx.restore();
let overlap = false;
for (let i = 1; i < ticks.length; i++)
  if (ticks[i].px - ticks[i - 1].px < (ticks[i].w + ticks[i - 1].w) / 2 + 8) overlap = true;
const y = c.scales.y;
ctx.save(); ctx.font = `${y.options.ticks.font.size}px system-ui, sans-serif`;
const rowLabel = Math.max(...y.ticks.map((t, i) =>
  ctx.measureText(y.options.ticks.callback.call(y, t.value, i, y.ticks)).width));
ctx.restore();
const lines = c.options.plugins.markers.lines;
return {bars, labels: c.data.labels, min: x.min, max: x.max, lines: lines.map((l) => ({t: l.t,
  label: l.label, px: x.getPixelForValue(l.t)})), left: c.chartArea.left,
  right: c.chartArea.right, ticks: ticks.length, overlap, rowLabelFits: rowLabel <= y.width};
"""


@pytest.fixture(scope="module")
def service_url(fhir_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service under gunicorn on a free loopback port, reading and writing the local HAPI."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tmp_path_factory.mktemp("app")
    env = {
        **os.environ,
        "FHIR_DM_FHIR__BASE_URL": fhir_base_url,
        "FHIR_DM_TRUST__MODE": "off",
        "FHIR_DM_PUBLIC_BASE_URL": url,
        "FHIR_DM_LOCK_DIR": str(tmp / "locks"),
        "FHIR_DM_LOG_LEVEL": "WARNING",
        "FHIR_DM_CDS__ENABLED": "true",
        "FHIR_DM_CDS__TRUST__MODE": "off",
        "FHIR_DM_CDS__PUBLIC_BASE_URL": url,
    }
    log_path = tmp / "gunicorn.log"
    command = [sys.executable, "-m", "gunicorn", "-w", "2", "-k", "gthread", "--threads", "2"]
    command += ["-b", f"127.0.0.1:{port}", "fhir_dm.web.wsgi:app"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass  # not listening yet
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not start:\n" + log_path.read_text())
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=30)


def _high_risk_with_a_done_test(hapi: FhirClient) -> str:
    """A woman of 54 with DM and anti-TIF1-gamma, whose blood count was done at diagnosis."""
    pid = f"app-{uuid.uuid4().hex[:10]}"
    p = f.patient(pid, birth_date="1970-01-01", name=[{"given": ["Maria"], "family": "Keller"}])
    p["identifier"] = [{"type": {"coding": [MR]}, "system": "urn:test:mrn", "value": "MRN-77012"}]
    knowledge = load_knowledge()
    store(
        hapi,
        p,
        f.iim_condition(p, id=f"{pid}-dm"),
        f.antibody(p, "tif1g", id=f"{pid}-tif1g"),
        {**f.done_request(p, knowledge, "cbc", "2024-03-10"), "id": f"{pid}-cbc"},
    )
    return pid


def _open(browser: Any, service_url: str, fhir_base_url: str, pid: str) -> float:
    """Launch the app on the patient (open-server launch); the page's first render, in ms."""
    browser.get(
        f"{service_url}/app/launch?fhirServiceUrl={fhir_base_url}&patientId={pid}&now={NOW}"
    )
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: (
            d.execute_script("return document.body.dataset.loaded") == "true"
            or "could not" in d.find_element(By.ID, "status").text
        )
    )
    status = browser.find_element(By.ID, "status").text
    assert browser.execute_script("return document.body.dataset.loaded") == "true", status
    return float(browser.execute_script("return Number(document.body.dataset.firstRender)"))


def _view(service_url: str, pid: str) -> Json:
    response = requests.post(f"{service_url}/app/api/Patient/{pid}/view?now={NOW}", timeout=60)
    response.raise_for_status()
    body: Json = response.json()
    return body


def _shot(browser: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, max(1000, int(height) + 40))
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    browser.set_window_size(1280, 1000)


def _width(browser: Any, width: int | None) -> None:
    """Lay the page out `width` CSS pixels wide (a phone: mobile viewport); None: as before."""
    if width is None:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        return
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600},
    )


def _doc_shot(browser: Any, name: str) -> None:
    """The page as laid out now (its top `DOC_SHOT_MAX_HEIGHT` pixels), into the
    documentation's images when asked for, as a 256-colour PNG to keep the repository small."""
    if not SCREENSHOTS:
        return
    directory = Path(SCREENSHOTS)
    directory = directory if directory.is_absolute() else ROOT / directory
    directory.mkdir(parents=True, exist_ok=True)
    width = int(browser.execute_script("return window.innerWidth"))
    height = int(browser.execute_script("return document.body.scrollHeight"))
    # A viewport as tall as the shot (the chart's canvas is redrawn when the viewport changes:
    # wait two frames for it), then a plain screenshot of it.
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {
            "width": width,
            "height": min(height, DOC_SHOT_MAX_HEIGHT),
            "deviceScaleFactor": 1,
            "mobile": width < 600,
        },
    )
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1]; window.scrollTo(0, 0);"
        "requestAnimationFrame(() => requestAnimationFrame(() => done(true)));"
    )
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600},
    )
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    image.quantize(colors=256).save(directory / f"{name}.png", optimize=True)


def _no_sideways_scroll(browser: Any) -> None:
    wide = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert wide[0] <= wide[1], f"the page scrolls sideways: {wide[0]} px content in {wide[1]} px"


def _axe(browser: Any, name: str) -> list[Json]:
    """Run axe-core on the page; every violation is saved, the serious and critical returned."""
    browser.execute_script(AXE.read_text(encoding="utf-8"))
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']})"
        ".then((r) => done(r.violations.map((v) => ({id: v.id, impact: v.impact,"
        " help: v.help, nodes: v.nodes.map((n) => n.target.join(' '))}))))"
        ".catch((e) => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"axe-{name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"axe-core {name}: {[(v['id'], v['impact'], len(v['nodes'])) for v in result]}")
    return [v for v in result if v["impact"] in ("serious", "critical")]


def _plans(hapi: FhirClient, pid: str) -> list[Json]:
    return [
        p
        for p in hapi.search("CarePlan", {"subject": f"Patient/{pid}"})
        if p.get("status") == "active"
    ]


def test_the_patient_page_shows_tier_counts_and_chart_and_writes_one_plan(
    browser: Any, service_url: str, fhir_base_url: str, hapi: FhirClient
) -> None:
    pid = _high_risk_with_a_done_test(hapi)
    expected = _view(service_url, pid)
    assert expected["counts"]["done"] >= 1 and expected["counts"]["overdue"] >= 1

    _open(browser, service_url, fhir_base_url, pid)  # warm: HAPI's first searches are slow
    first_render_ms = _open(browser, service_url, fhir_base_url, pid)
    _shot(browser, "patient-page-before-write")
    browser.find_element(By.ID, "chart").screenshot(str(ARTIFACTS / "timeline-chart.png"))

    # Who: name, age, sex, MRN and the one diagnosis date, with its source.
    assert browser.find_element(By.ID, "patient").text == "Maria Keller"
    assert browser.find_element(By.ID, "who-age").text == "54 years"
    assert browser.find_element(By.ID, "who-sex").text == "female"
    assert browser.find_element(By.ID, "who-mrn").text == "MRN-77012"
    diagnosis = browser.find_element(By.ID, "who-diagnosis").text
    assert diagnosis.startswith(expected["diagnosis"]["date"] + " (from ")
    # The onset is labelled as onset; the one diagnosis date is in the header.
    assert browser.find_element(By.ID, "onset-line").text.startswith("Symptom onset ")

    assert browser.find_element(By.ID, "tier").text == "High risk"
    assert not browser.find_element(By.ID, "preliminary").is_displayed()
    for status in ("done", "due", "overdue", "upcoming"):
        shown = browser.find_element(By.CSS_SELECTOR, f'#counts li[data-status="{status}"] .count')
        assert int(shown.text) == expected["counts"][status], status
    items = expected["items"]
    assert browser.find_element(By.ID, "items-line").text.startswith(items["line"])
    # What writing would do, in the clinician's words: no FHIR reference, the same counts.
    plan_summary = browser.find_element(By.ID, "plan-summary").text
    assert "Patient/" not in plan_summary
    assert items["line"].removeprefix("Proposed: ") in plan_summary

    # What each factor contributed; the reasons in clinical words, the rules behind a summary.
    factors = browser.find_elements(By.CSS_SELECTOR, "#factors tbody tr")
    assert [r.find_element(By.CSS_SELECTOR, "td.contribution").text for r in factors] == [
        fa["contribution"] for fa in expected["factors"]
    ]
    assert "anti-TIF1-gamma positive" in browser.find_element(By.ID, "factors").text
    reasons = browser.find_element(By.ID, "reasons").text
    assert "rule " not in reasons and "[BMJ]" not in reasons
    evidence = browser.find_element(By.ID, "evidence-box")
    assert evidence.tag_name == "details" and evidence.get_attribute("open") is None
    assert not browser.find_element(By.ID, "evidence").is_displayed()

    # The timeline: one bar per item, the tests' names as the rows, today inside the plot, and
    # axis labels that do not overlap.
    chart = browser.execute_script(CHART_STATE)
    assert len(chart["bars"]) == len(expected["explanation"]["schedule"])
    overdue_bars = [b for b in chart["bars"] if b["status"] == "overdue"]
    assert len(overdue_bars) == expected["counts"]["overdue"]
    assert set(chart["labels"]) == {r["test"] for r in expected["explanation"]["schedule"]}
    today, diagnosis_line = chart["lines"]
    assert today["label"] == f"Today {NOW}" and diagnosis_line["label"].startswith("Diagnosis")
    assert chart["left"] < today["px"] < chart["right"]
    assert chart["ticks"] >= 3 and not chart["overlap"] and chart["rowLabelFits"]
    rows = browser.find_elements(By.CSS_SELECTOR, "#items tbody tr")
    assert rows[0].get_attribute("data-status") == "overdue"  # overdue first
    kinds = [r.find_elements(By.TAG_NAME, "td")[4].text for r in rows]
    assert kinds.count("service request") == items["orders"]
    assert kinds.count("care-plan activity") == items["activities"]
    assert "imacs-2023" in browser.execute_script(
        "return document.getElementById('ruleset').textContent"
    )
    assert _axe(browser, "patient-page") == []
    _doc_shot(browser, "patient-page-desktop")

    # Keyboard: the write button is reachable and pressed with the keyboard.
    button = browser.find_element(By.ID, "write")
    assert button.is_displayed() and _plans(hapi, pid) == []
    button.send_keys("\n")
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: d.find_element(By.ID, "write-result").text.startswith(("Written", "Not"))
    )
    _shot(browser, "patient-page-after-write")
    assert "; written" in browser.find_element(By.ID, "write-result").text
    assert not browser.find_element(By.ID, "write").is_displayed()
    assert len(_plans(hapi, pid)) == 1

    # Reopened, the plan is on file: no button, and nothing more is written.
    _open(browser, service_url, fhir_base_url, pid)
    assert not browser.find_element(By.ID, "write").is_displayed()
    assert "on file" in browser.find_element(By.ID, "plan-summary").text
    assert len(_plans(hapi, pid)) == 1

    # At phone width: nothing scrolls sideways, the tables are stacked, the chart still draws.
    _width(browser, PHONE)
    try:
        _open(browser, service_url, fhir_base_url, pid)
        _no_sideways_scroll(browser)
        phone = browser.execute_script(CHART_STATE)
        assert phone["left"] > 0 and phone["ticks"] >= 2
        assert not phone["overlap"] and phone["rowLabelFits"]
        assert _axe(browser, "patient-page-phone") == []
        _doc_shot(browser, "patient-page-phone")
    finally:
        _width(browser, None)

    figures = {
        "first_render_ms": first_render_ms,
        "bundle_bytes": {
            name: len(requests.get(f"{service_url}/app/static/{name}", timeout=30).content)
            for name in (
                "vendor/fhir-client-2.6.3.min.js",
                "vendor/chart-4.5.1.umd.min.js",
                "app.js",
                "app.css",
            )
        },
    }
    (ARTIFACTS / "render.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    # Recorded, never asserted: a timed assertion fails on a loaded machine (speed is a bench
    # figure, see bench/).
    print(f"app first render on the local HAPI: {first_render_ms:.0f} ms; {figures}")


def test_a_moderate_preliminary_patient_shows_the_preliminary_badge(
    browser: Any, service_url: str, fhir_base_url: str, hapi: FhirClient
) -> None:
    pid = f"app-{uuid.uuid4().hex[:10]}"
    p = f.patient(pid, birth_date="1994-01-01")
    store(hapi, p, f.iim_condition(p, id=f"{pid}-dm"))
    _open(browser, service_url, fhir_base_url, pid)
    _shot(browser, "patient-page-moderate-preliminary")
    assert browser.find_element(By.ID, "tier").text == "Moderate risk"
    assert browser.find_element(By.ID, "preliminary").is_displayed()
    assert browser.find_element(By.ID, "patient").text == "Name not recorded"
    factors = browser.find_element(By.CSS_SELECTOR, "#factors tbody").text
    assert factors == "Dermatomyositis high-risk factor"
    assert "1 high-risk factor" in browser.find_element(By.ID, "tier-basis").text
    unknown = browser.find_elements(By.CSS_SELECTOR, "#unknown li")
    assert any("anti-TIF1-gamma" in li.text for li in unknown)


def test_a_patient_who_is_not_stratified_shows_no_tier_and_no_factor_table(
    browser: Any, service_url: str, fhir_base_url: str, hapi: FhirClient
) -> None:
    pid = f"app-{uuid.uuid4().hex[:10]}"
    p = f.patient(pid, birth_date="1958-06-01", gender="male")
    store(hapi, p, f.iim_condition(p, id=f"{pid}-ibm", code="72315009"))  # IBM
    _open(browser, service_url, fhir_base_url, pid)
    assert browser.find_element(By.ID, "tier").text == "Not stratified"
    assert not browser.find_element(By.ID, "factors").is_displayed()
    assert not browser.find_element(By.ID, "tier-basis").is_displayed()


def _clinic_patients(hapi: FhirClient) -> tuple[str, str, str, str]:
    """Three named IIM patients: two of one (new) organisation with a long name, one of them
    overdue, one due soon; one of another organisation, more overdue. Ids start with "0" so
    that the clinic's per-call limit (first patients by id) keeps them whatever else the server
    holds."""
    tag = uuid.uuid4().hex[:8]
    org_id, gp_id = f"org-{tag}", f"gp-{tag}"
    org_name = f"Rheumatology and Neuromuscular Diseases Outpatient Clinic {tag}, Northern Hospital"
    org = {"resourceType": "Organization", "id": org_id, "name": org_name}
    gp = {
        "resourceType": "Practitioner",
        "id": gp_id,
        "name": [{"prefix": ["Dr"], "given": ["Helen"], "family": "Okafor"}],
    }
    at_org = {"reference": f"Organization/{org_id}"}
    overdue, soon, elsewhere = (f"0clinic-{tag}-{n}" for n in ("a", "b", "c"))
    a = f.patient(
        overdue,
        birth_date="1970-01-01",
        managingOrganization=at_org,
        generalPractitioner=[{"reference": f"Practitioner/{gp_id}"}],
        name=[{"given": ["Anna"], "family": f"Berg {tag}"}],
    )
    b = f.patient(
        soon,
        birth_date="1990-01-01",
        managingOrganization=at_org,
        name=[{"given": ["Jonas"], "family": f"Lind {tag}"}],
    )
    c = f.patient(
        elsewhere,
        birth_date="1970-01-01",
        managingOrganization={"display": "Other"},
        name=[{"given": ["Carl"], "family": f"Dahl {tag}"}],
    )
    store(
        hapi,
        org,
        gp,
        a,
        f.iim_condition(a, id=f"{overdue}-dm"),
        f.antibody(a, "tif1g", id=f"{overdue}-ab"),
        b,
        f.iim_condition(b, id=f"{soon}-dm", onset="2024-07-10"),
        c,
        f.iim_condition(c, id=f"{elsewhere}-dm", onset="2024-01-01"),
        f.antibody(c, "tif1g", id=f"{elsewhere}-ab"),
    )
    return org_name, overdue, soon, elsewhere


def _clinic_loaded(browser: Any) -> None:
    # Wait for the clinic page itself: the patient page's body is "loaded" until it is gone.
    WebDriverWait(browser, WAIT_S * 2, ignored_exceptions=NAVIGATING).until(
        lambda d: (
            d.find_elements(By.ID, "patients")
            and (
                d.execute_script("return document.body.dataset.loaded") == "true"
                or "could not" in d.find_element(By.ID, "status").text
            )
        )
    )
    status = browser.find_element(By.ID, "status").text
    assert browser.execute_script("return document.body.dataset.loaded") == "true", status


def test_the_clinic_page_lists_one_row_per_patient_by_name_and_draws_the_measures(
    browser: Any, service_url: str, fhir_base_url: str, hapi: FhirClient
) -> None:
    org, overdue, soon, _elsewhere = _clinic_patients(hapi)
    _open(browser, service_url, fhir_base_url, overdue)
    browser.find_element(By.ID, "to-clinic").click()  # from the patient page to the clinic
    _clinic_loaded(browser)

    Select(browser.find_element(By.ID, "filter-organization")).select_by_visible_text(org)
    _doc_shot(browser, "clinic-page-desktop")
    rows = browser.find_elements(By.CSS_SELECTOR, "#patients tbody tr.patient-row")
    patients = [r.get_attribute("data-patient") for r in rows]
    assert patients == [f"Patient/{overdue}", f"Patient/{soon}"]  # one row each, overdue first
    first = rows[0]
    assert first.find_element(By.CSS_SELECTOR, "a.patient").text.startswith("Anna Berg")
    assert "Dr Helen Okafor" in first.text
    assert org in first.text and "Organization/" not in first.text
    assert "days overdue" in first.find_element(By.CSS_SELECTOR, "td.overdue").text
    # The row opens to its items, from the keyboard.
    toggle = first.find_element(By.CSS_SELECTOR, "button.toggle")
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.send_keys(" ")
    detail = browser.find_element(By.ID, toggle.get_attribute("aria-controls"))
    assert detail.is_displayed() and toggle.get_attribute("aria-expanded") == "true"
    items = detail.find_element(By.TAG_NAME, "table")
    first_item = items.find_element(By.CSS_SELECTOR, ":scope > tbody > tr")
    assert first_item.get_attribute("data-status") == "overdue"

    # One chart per measure, with bars; the overdue measure is 1 of 2 in this organisation.
    charts = browser.find_elements(By.CSS_SELECTOR, "#measures svg.measure-chart")
    assert len(charts) == 5
    assert browser.find_elements(By.CSS_SELECTOR, "#measures rect.bar")
    bar = browser.find_element(By.CSS_SELECTOR, "#measure-dm-any-overdue rect.bar.measure-all")
    assert float(bar.get_attribute("data-score")) == 0.5
    table = browser.find_element(By.ID, "measure-table").text
    assert "Patients with any overdue screening item All patients 1 2 50%" in table
    # Completion over time: one chart per completion measure, one column per quarter.
    over_time = browser.find_elements(By.CSS_SELECTOR, "#over-time svg.over-time-chart")
    assert len(over_time) == 4
    assert len(over_time[0].find_elements(By.CSS_SELECTOR, "rect.track")) == 4
    _shot(browser, "clinic-page")
    assert _axe(browser, "clinic-page") == []  # with one patient's items open

    # At phone width: no sideways scroll, the long organisation name wraps inside its card.
    _width(browser, PHONE)
    try:
        browser.refresh()
        _clinic_loaded(browser)
        Select(browser.find_element(By.ID, "filter-organization")).select_by_visible_text(org)
        _no_sideways_scroll(browser)
        card = browser.find_element(By.CSS_SELECTOR, "section[aria-labelledby=filter-heading]")
        select = browser.find_element(By.ID, "filter-organization")
        assert select.rect["x"] + select.rect["width"] <= card.rect["x"] + card.rect["width"]
        _doc_shot(browser, "clinic-page-phone")
        first = browser.find_element(By.CSS_SELECTOR, "#patients tbody tr.patient-row")
        first.find_element(By.CSS_SELECTOR, "button.toggle").click()
        _no_sideways_scroll(browser)
        assert _axe(browser, "clinic-page-phone") == []
    finally:
        _width(browser, None)

    # Back to a patient, from the list, with the keyboard.
    browser.refresh()
    _clinic_loaded(browser)
    link = browser.find_element(By.CSS_SELECTOR, f'tr[data-patient="Patient/{overdue}"] a.patient')
    link.send_keys("\n")
    WebDriverWait(browser, WAIT_S, ignored_exceptions=NAVIGATING).until(
        lambda d: (
            d.execute_script("return document.body.dataset.loaded") == "true"
            and d.find_elements(By.ID, "tier")
            and d.find_element(By.ID, "patient").text.startswith("Anna Berg")
        )
    )
    assert browser.find_element(By.ID, "tier").text == "High risk"


def _cds_prefetch(service_url: str, fhir_base_url: str, patient_id: str) -> Json:
    """What the CDS Hooks sandbox does: read discovery, run every template on the FHIR server."""
    discovery = requests.get(f"{service_url}/cds-services", timeout=60)
    discovery.raise_for_status()
    [service] = discovery.json()["services"]
    prefetch: Json = {}
    for name, template in service["prefetch"].items():
        query = render(template, {"patientId": patient_id})
        response = requests.get(f"{fhir_base_url}/{query}", timeout=60)
        prefetch[name] = response.json() if response.status_code == 200 else None
    return prefetch


def test_the_card_as_a_cds_client_shows_it(
    browser: Any, service_url: str, fhir_base_url: str, hapi: FhirClient
) -> None:
    pid = _high_risk_with_a_done_test(hapi)
    body = {
        "hook": "patient-view",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/app-test-user", "patientId": pid},
        "prefetch": _cds_prefetch(service_url, fhir_base_url, pid),
    }
    response = requests.post(
        f"{service_url}/cds-services/dm-cancer-screening?now={NOW}", json=body, timeout=120
    )
    assert response.status_code == 200, response.text[:500]
    cards = response.json()
    assert cards["cards"], cards
    browser.get(CARD_VIEWER.as_uri())
    for name, width in (("cds-card-desktop", DESKTOP), ("cds-card-phone", PHONE)):
        _width(browser, width)
        try:
            browser.execute_script(
                "showCards(arguments[0], arguments[1])", cards, "patient-view: the service's cards"
            )
            shown = browser.find_element(By.CSS_SELECTOR, ".card .summary").text
            assert shown == cards["cards"][0]["summary"]
            _no_sideways_scroll(browser)
            _doc_shot(browser, name)
        finally:
            _width(browser, None)
