"""The clinician's view: a SMART on FHIR app (static pages) and the one JSON endpoint it reads.

The pages are static files (`static/`); the SMART launch and the OAuth 2 flow with PKCE run in
the browser with the `fhirclient` library. The app reads its data from `POST
/app/api/Patient/{id}/view`, which previews the patient's assessment through the same write-back
preview as `$dm-cancer-screening?preview=true` and returns the core's Explanation with each
item's status, so the page and every other output render one structure. Writing goes through
the service's own `$dm-cancer-screening` operation, with the clinician's token.

The clinic page reads `POST /app/api/clinic`: the population module's finder, per-patient
rows, worklist and §11 measures over the IIM patients of the service's FHIR server, at most
`CLINIC_MAX_PATIENTS` per call (the answer says when it was cut). It also gives the completion
measures over time: per quarter (3-month periods ending on the evaluation date), counted from the
same rows (a past round's window and done dates are in today's assessment).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import DeadlineExceededError, FhirDmError, InputError
from fhir_dm.fhir.client import client_from_config
from fhir_dm.knowledge.models import Knowledge
from fhir_dm.population.config import MeasureConfig, PopulationConfig, load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import NO_VALUE, measure_report
from fhir_dm.population.rows import PatientRow
from fhir_dm.population.run import PopulationRunner
from fhir_dm.population.worklist import worklist
from fhir_dm.web.settings import Service, current_service
from fhir_dm.writeback.writer import PatientWrite

LAUNCH_PATH = "/app/launch"
bp = Blueprint("app_ui", __name__, url_prefix="/app", static_folder="static")

_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# The pages load scripts and styles from the service only; the SMART client talks to the EHR's
# FHIR and authorisation servers, whose origins are known only at launch.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' https: http:; frame-ancestors *; base-uri 'none'; form-action 'none'"
)
Json = dict[str, Any]
# Patients one clinic call assesses (each a preview: about eight FHIR searches). 50 stay well
# inside the request deadline on a local server; a larger clinic belongs to an offline run
# (`fhir-dm population worklist|measure`). The answer says when the list was cut.
CLINIC_MAX_PATIENTS = 50
# The measures' default reporting period: the year ending on the evaluation date.
CLINIC_PERIOD_DAYS = 365
# The completion measures over time: this many 3-month periods, the last ending on the evaluation
# date (a display choice: one year, as the default period, in quarters).
CLINIC_QUARTERS = 4
# Stop assessing when less than this is left of the request's deadline, to answer in time.
CLINIC_RESERVE_SECONDS = 3.0


def init_app(app: Flask) -> None:
    """Serve the app under /app."""
    app.register_blueprint(bp)


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", _CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


def _page(name: str) -> Response:
    assert bp.static_folder is not None
    response = send_from_directory(bp.static_folder, name, max_age=0)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/launch")
def launch() -> Response:
    """The SMART launch page (EHR launch with `iss` and `launch`, or standalone)."""
    return _page("launch.html")


@bp.get("/")
def index() -> Response:
    """The app page: the SMART redirect target, then the patient's screening view."""
    return _page("index.html")


@bp.get("/config.json")
def config() -> Response:
    """What the launch page needs: the SMART client id and scopes of this deployment."""
    settings = current_service().settings
    return jsonify({"clientId": settings.smart_client_id, "scope": settings.smart_scope})


def _date_arg(name: str) -> date | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    if not _DATE.fullmatch(raw):
        raise InputError(f"query parameter {name} must be a full date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InputError(f"query parameter {name} is not a valid date") from None


def _now() -> date:
    return _date_arg("now") or datetime.now(UTC).date()


def _authenticate(service: Service, allowed: set[str]) -> None:
    """The caller's token, as for the operations; then refuse unknown query parameters."""
    audience = service.settings.public_base_url + request.path
    service.auth.authenticate(request.headers.get("Authorization"), audience=audience)
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise InputError(f"unknown query parameter(s): {', '.join(unknown)}")


def patient_view(write: PatientWrite) -> Json:
    """The page's data: the Explanation, item statuses, rounds and what writing would do."""
    result = write.result
    plan = result.plan
    a = plan.assessment
    explanation = result.explanation
    counts = dict.fromkeys(("done", "due", "overdue", "upcoming"), 0)
    for row in explanation.schedule:
        counts[row.status] = counts.get(row.status, 0) + 1
    revision = write.revision
    on_file = write.status == "unchanged" or bool(revision and revision.plan_on_server)
    replaces = bool(revision and (revision.revoked_plans or revision.updated_plans))
    return {
        "patient": result.patient_reference,
        "today": a.now.isoformat(),
        "tier": result.tier,
        "preliminary": a.preliminary,
        "explanation": asdict(explanation),
        "factors": [
            {"id": f.id, "kind": f.kind, "label": f.label, "evidence": f.evidence}
            for f in a.factors
        ],
        "preliminaryBecause": list(a.preliminary_because),
        "diagnosis": {
            "date": plan.anchor.isoformat() if plan.anchor else None,
            "source": plan.anchor_source,
        },
        "rounds": [
            {"id": rid, "label": label, "start": start.isoformat(), "end": end.isoformat()}
            for rid, label, start, end in plan.rounds()
        ],
        "counts": counts,
        "plan": {
            "status": write.status,
            "summary": write.summary(),
            "proposed": result.care_plan is not None,
            "onFile": on_file,
            # Something would be written: a first plan, or a revision of the one on file.
            "writable": write.status == "preview" and result.care_plan is not None,
            "revision": replaces,
        },
    }


@bp.post("/api/Patient/<id>/view")
def view(id: str) -> Response:
    """Preview one patient's assessment (nothing is written) as the page's JSON."""
    service: Service = current_service()
    audience = service.settings.public_base_url + request.path
    service.auth.authenticate(request.headers.get("Authorization"), audience=audience)
    if not _FHIR_ID.fullmatch(id):
        raise InputError("not a valid FHIR resource id")
    unknown = sorted(set(request.args) - {"now"})
    if unknown:
        raise InputError(f"unknown query parameter(s): {', '.join(unknown)}")
    write = service.writeback.assess_patient(id, now=_now(), preview=True)
    response = jsonify(patient_view(write))
    response.headers["Cache-Control"] = "no-store"
    return response


def _label_maps(knowledge: Knowledge) -> tuple[dict[str, str], dict[str, str]]:
    """Tier and round labels of the rule set, for the clinic page's charts."""
    tiers = {level.id: level.label for level in knowledge.ruleset.tiers.levels}
    rounds: dict[str, str] = {}
    for schedule in knowledge.ruleset.schedules.values():
        for r in schedule.rounds:
            rounds.setdefault(r.id, r.label)
    return tiers, rounds


def _counts(group: Json) -> Json:
    """Initial population, denominator, numerator and score of a MeasureReport group/stratum."""
    out: Json = {p["code"]["coding"][0]["code"]: p["count"] for p in group["population"]}
    score = group.get("measureScore")
    return {
        "initial": out["initial-population"],
        "denominator": out["denominator"],
        "numerator": out["numerator"],
        "score": score["value"] if score else None,
    }


def _measure_summary(
    knowledge: Knowledge,
    measure: MeasureConfig,
    rows: Sequence[PatientRow],
    period: tuple[date, date],
    generated: datetime,
) -> Json:
    """One measure over `rows`, read back from its MeasureReport: overall, per tier, per round."""
    report = measure_report(
        knowledge, measure, rows, period, subject_list=False, generated=generated
    )
    group = report["group"][0]
    by_tier = []
    for stratifier in group["stratifier"]:
        if stratifier["code"][0]["text"] == "tier":
            by_tier = [
                {"tier": s["value"]["text"], **_counts(s)} for s in stratifier.get("stratum", [])
            ]
    by_round = []
    if measure.kind == "completion" and len(measure.rounds) > 1:
        for round_id in measure.rounds:
            one = measure.model_copy(update={"rounds": (round_id,)})
            one_report = measure_report(
                knowledge, one, rows, period, subject_list=False, generated=generated
            )
            by_round.append({"round": round_id, **_counts(one_report["group"][0])})
    return {"id": measure.id, **_counts(group), "byTier": by_tier, "byRound": by_round}


def _months_before(day: date, months: int) -> date:
    """The same day `months` months earlier (the month's last day when it is shorter)."""
    index = day.year * 12 + day.month - 1 - months
    year, month = divmod(index, 12)
    month += 1
    return date(year, month, min(day.day, calendar.monthrange(year, month)[1]))


def quarters(now: date, count: int = CLINIC_QUARTERS) -> list[tuple[date, date]]:
    """`count` consecutive 3-month periods (both ends included), oldest first, the last ending
    on `now`; each starts the day after the previous one ends."""
    ends = [_months_before(now, 3 * i) for i in range(count + 1)]
    return [(ends[i + 1] + timedelta(days=1), ends[i]) for i in reversed(range(count))]


def over_time(
    knowledge: Knowledge,
    measures: Sequence[MeasureConfig],
    rows: Sequence[PatientRow],
    periods: Sequence[tuple[date, date]],
    generated: datetime,
) -> list[Json]:
    """The completion measures per period, from the rows already assessed on the evaluation
    date. The overdue measure is left out: it is a status on the evaluation date, and a past
    date's status is not in the rows."""
    out = []
    for start, end in periods:
        results = []
        for m in measures:
            if m.kind != "completion":
                continue
            report = measure_report(
                knowledge, m, rows, (start, end), subject_list=False, generated=generated
            )
            counts = _counts(report["group"][0])
            results.append(
                {"id": m.id, **{k: counts[k] for k in ("numerator", "denominator", "score")}}
            )
        out.append(
            {"period": {"start": start.isoformat(), "end": end.isoformat()}, "measures": results}
        )
    return out


def _filter_keys(rows: Sequence[PatientRow]) -> list[tuple[str | None, str | None]]:
    """Every (organisation, practitioner) filter the page can choose; None: any."""
    keys: dict[tuple[str | None, str | None], None] = {(None, None): None}
    for row in rows:
        org, gp = row.organization or NO_VALUE, row.practitioner or NO_VALUE
        for key in ((org, None), (None, gp), (org, gp)):
            keys.setdefault(key)
    return list(keys)


def _selected(rows: Sequence[PatientRow], org: str | None, gp: str | None) -> list[PatientRow]:
    return [
        r
        for r in rows
        if (org is None or (r.organization or NO_VALUE) == org)
        and (gp is None or (r.practitioner or NO_VALUE) == gp)
    ]


def _assess(
    service: Service, patient_ids: Sequence[str], now: date
) -> tuple[list[PatientRow], list[Json], bool]:
    """Preview-assess each patient (the population runner's `assess_one`), in this thread.

    In this thread so the request's deadline applies to every FHIR call; the list stops early
    (the third value True) when too little time is left to answer.
    """
    runner = PopulationRunner(
        lambda: client_from_config(service.settings.fhir),
        service.engine,
        service.knowledge,
        service.locks,
    )
    rows: list[PatientRow] = []
    failed: list[Json] = []
    try:
        for patient_id in patient_ids:
            left = deadlines.remaining_or_none()
            if left is not None and left < CLINIC_RESERVE_SECONDS:
                return rows, failed, True
            try:
                rows.append(runner.assess_one(patient_id, now=now, preview=True).row)
            except DeadlineExceededError:
                return rows, failed, True
            except FhirDmError as exc:  # one patient never hides the clinic
                failed.append({"patient": f"Patient/{patient_id}", "error": type(exc).__name__})
    finally:
        runner.close()
    return rows, failed, False


def clinic_view(service: Service, population: PopulationConfig, now: date, start: date) -> Json:
    """The clinic page's data: worklist, measure summaries per filter, and the MeasureReports."""
    knowledge = service.knowledge
    tokens = iim_search_tokens(knowledge, population.finder)
    found = find_iim_patients(service.fhir, tokens)
    rows, failed, out_of_time = _assess(service, found[:CLINIC_MAX_PATIENTS], now)
    truncated = None
    if out_of_time:
        truncated = {
            "reason": "time",
            "message": f"only {len(rows) + len(failed)} of {len(found)} patients could be"
            " assessed within the request's time limit",
        }
    elif len(found) > CLINIC_MAX_PATIENTS:
        truncated = {
            "reason": "limit",
            "message": f"{len(found)} patients found; the first {CLINIC_MAX_PATIENTS} (by id)"
            " are shown. Use `fhir-dm population worklist` for the whole clinic.",
        }
    period = (start, now)
    generated = datetime.now(UTC)
    items = worklist(rows, now, population.worklist.soon_due_days)
    tiers, rounds = _label_maps(knowledge)
    return {
        "today": now.isoformat(),
        "period": {"start": start.isoformat(), "end": now.isoformat()},
        "limit": CLINIC_MAX_PATIENTS,
        "found": len(found),
        "assessed": len(rows),
        "failed": failed,
        "truncated": truncated,
        "noValue": NO_VALUE,
        "labels": {"tiers": tiers, "rounds": rounds},
        "patients": [
            {
                "patient": r.patient,
                "tier": r.tier,
                "organization": r.organization or NO_VALUE,
                "practitioner": r.practitioner or NO_VALUE,
            }
            for r in rows
        ],
        "worklist": [
            {
                **asdict(w),
                "organization": w.organization or NO_VALUE,
                "practitioner": w.practitioner or NO_VALUE,
            }
            for w in items
        ],
        "measures": [
            {
                "id": m.id,
                "title": m.title,
                "kind": m.kind,
                "improvement": "decrease" if m.kind == "overdue" else "increase",
                "rounds": list(m.rounds),
                "source": m.source,
            }
            for m in population.measures
        ],
        "results": [
            {
                "organization": org,
                "practitioner": gp,
                "measures": [
                    _measure_summary(knowledge, m, _selected(rows, org, gp), period, generated)
                    for m in population.measures
                ],
                "overTime": over_time(
                    knowledge,
                    population.measures,
                    _selected(rows, org, gp),
                    quarters(now),
                    generated,
                ),
            }
            for org, gp in _filter_keys(rows)
        ],
        "reports": [
            measure_report(knowledge, m, rows, period, subject_list=False, generated=generated)
            for m in population.measures
        ],
    }


@bp.get("/clinic")
def clinic_page() -> Response:
    """The clinic page: the worklist and the §11 measures of the service's IIM patients."""
    return _page("clinic.html")


@bp.post("/api/clinic")
def clinic() -> Response:
    """Preview-assess the clinic's IIM patients (nothing is written); the clinic page's JSON."""
    service: Service = current_service()
    _authenticate(service, {"now", "start"})
    now = _now()
    start = _date_arg("start") or now - timedelta(days=CLINIC_PERIOD_DAYS)
    if start > now:
        raise InputError("query parameter start is after the evaluation date")
    population = load_population_config(service.knowledge, service.settings.config_dir)
    response = jsonify(clinic_view(service, population, now, start))
    response.headers["Cache-Control"] = "no-store"
    return response
