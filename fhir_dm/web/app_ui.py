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
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory

from fhir_dm.common import deadline as deadlines
from fhir_dm.common.errors import DeadlineExceededError, FhirDmError, InputError
from fhir_dm.core.dates import years_between
from fhir_dm.core.explain import factor_text
from fhir_dm.core.facts import UNKNOWN
from fhir_dm.core.ids import is_fhir_id
from fhir_dm.core.rules import Assessment, tier_rule
from fhir_dm.fhir.client import FhirClient, client_from_config
from fhir_dm.knowledge.models import IdentifierType, Knowledge
from fhir_dm.population.config import MeasureConfig, PopulationConfig, load_population_config
from fhir_dm.population.finder import find_iim_patients, iim_search_tokens
from fhir_dm.population.measures import NO_VALUE, measure_report
from fhir_dm.population.rows import ItemRow, PatientRow
from fhir_dm.population.run import PopulationRunner
from fhir_dm.population.worklist import worklist
from fhir_dm.web.authorize import require_patient, require_population
from fhir_dm.web.params import check_fhir_id, parse_date
from fhir_dm.web.settings import Service, Settings, current_service
from fhir_dm.web.trust import Principal
from fhir_dm.writeback.writer import PatientWrite

LAUNCH_PATH = "/app/launch"
bp = Blueprint("app_ui", __name__, url_prefix="/app", static_folder="static")

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
# Ids per `_id` search when names are fetched in batch: short enough for any server's URL limit.
IDS_PER_SEARCH = 100
# The resource types whose names the clinic page shows, and the elements it needs of each.
NAMED_TYPES = {"Patient": "name", "Organization": "name", "Practitioner": "name"}


def init_app(app: Flask) -> None:
    """Serve the app under /app."""
    app.register_blueprint(bp)


def content_security_policy(settings: Settings) -> str:
    """The pages' CSP: scripts and styles from the service only; calls to the service, the FHIR
    server and `app_connect_origins` (the SMART client talks to the EHR's FHIR and
    authorisation servers); framed only by the service itself and `app_frame_ancestors`."""
    connect = ["'self'", _origin(settings.fhir.base_url), *settings.app_connect_origins]
    frame = ["'self'", *settings.app_frame_ancestors]
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src {' '.join(dict.fromkeys(connect))}; "
        f"frame-ancestors {' '.join(dict.fromkeys(frame))}; base-uri 'none'; form-action 'none'"
    )


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@bp.after_request
def _headers(response: Response) -> Response:
    csp = content_security_policy(current_service().settings)
    response.headers.setdefault("Content-Security-Policy", csp)
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
    return parse_date(raw, f"query parameter {name}")


def _now() -> date:
    return _date_arg("now") or datetime.now(UTC).date()


def _authenticate(service: Service, allowed: set[str]) -> Principal:
    """The caller's token, as for the operations; then refuse unknown query parameters."""
    audience = service.settings.public_base_url + request.path
    principal = service.auth.authenticate(request.headers.get("Authorization"), audience=audience)
    unknown = sorted(set(request.args) - allowed)
    if unknown:
        raise InputError(f"unknown query parameter(s): {', '.join(unknown)}")
    return principal


def human_name(resource: Json | None) -> str | None:
    """A Patient's or Practitioner's name as people write it (the first usable HumanName: its
    `text`, else prefix, given and family names), or an Organization's `name`."""
    if not resource:
        return None
    name = resource.get("name")
    if isinstance(name, str):
        return name.strip() or None
    if not isinstance(name, list):
        return None
    ranked = sorted(
        (n for n in name if isinstance(n, dict)), key=lambda n: n.get("use") != "official"
    )
    for n in ranked:
        text = n.get("text")
        if isinstance(text, str) and text.strip():
            return text.strip()
        parts = [*(n.get("prefix") or []), *(n.get("given") or []), n.get("family") or ""]
        joined = " ".join(str(p) for p in parts if p).strip()
        if joined:
            return joined
    return None


def medical_record_number(patient: Json | None, mrn_type: IdentifierType) -> str | None:
    """The value of the Patient's identifier of the site's MRN type (config/site.yaml), None if
    it has none."""
    wanted = (mrn_type.system, mrn_type.code)
    for identifier in (patient or {}).get("identifier") or []:
        codings = ((identifier.get("type") or {}).get("coding")) or []
        if any((c.get("system"), c.get("code")) == wanted for c in codings):
            value = identifier.get("value")
            if isinstance(value, str) and value:
                return value
    return None


def _age(a: Assessment) -> str | None:
    """Age in whole years on the evaluation date (a span when the birth date is partial)."""
    birth = a.facts.birth_date
    if birth is None:
        return None
    youngest = int(years_between(birth.latest, a.now))
    oldest = int(years_between(birth.earliest, a.now))
    return str(oldest) if youngest == oldest else f"{youngest}-{oldest}"


def header(write: PatientWrite, patient: Json | None, knowledge: Knowledge) -> Json:
    """Who the page is about: name, age, sex as the rules read it, MRN, and the one diagnosis
    date the schedule is dated from (with where it was read), plus the symptom onset."""
    plan = write.result.plan
    a = plan.assessment
    iim = a.facts.iim
    sex = a.facts.sex.value
    condition = iim.reference if iim is not None else None
    diagnosis = None
    if plan.anchor is not None:
        diagnosis = {"date": plan.anchor.isoformat(), "source": plan.anchor_source}
    onset = None
    if iim is not None and iim.onset is not None:
        onset = {"date": str(iim.onset), "source": iim.onset_source}
    return {
        "name": human_name(patient),
        "age": _age(a),
        "sex": "not recorded" if sex is UNKNOWN else str(sex),
        "sexNote": a.facts.sex_uncertain,
        "mrn": medical_record_number(patient, knowledge.site.patient_display.mrn_identifier_type),
        "diagnosis": diagnosis,
        "onset": onset,
        # The IIM Condition both dates were read from.
        "condition": condition,
    }


def stratified(a: Assessment) -> bool:
    """Whether the tier applies: the guideline applies, or did until the window closed (an
    excluded subtype such as IBM, or a juvenile onset, gets no tier, whatever its factors)."""
    return a.tier is not None and a.scope in ("in-scope", "window-closed")


def factor_contributions(a: Assessment, knowledge: Knowledge) -> Json:
    """What each factor that applied contributed to the tier, and the tier rule that decided
    it; nothing for a patient who is not stratified."""
    if not stratified(a):
        return {"factors": [], "basis": None}
    rs = knowledge.ruleset
    weight = {"factor-high": "high-risk factor", "factor-intermediate": "intermediate-risk factor"}
    factors = [
        {
            "id": f.id,
            "factor": factor_text(f.label, f.facts),
            "contribution": weight.get(f.kind, "recorded; does not change the tier"),
            "class": f.kind.removeprefix("factor-"),
            "evidence": f.evidence,
            "rule": f.id,
            "label": f.label,
        }
        for f in a.factors
    ]
    high = sum(f.kind == "factor-high" for f in a.factors)
    intermediate = sum(f.kind == "factor-intermediate" for f in a.factors)
    assert a.tier is not None
    label = rs.tiers.level(a.tier).label
    rule = tier_rule(rs, high, intermediate)
    if rule is None:
        basis = (
            f"{label}: {_count(high, 'high-risk factor')} and "
            f"{_count(intermediate, 'intermediate-risk factor')}"
        )
    elif rule.min_high is not None and high >= rule.min_high:
        basis = f"{label}: {_count(high, 'high-risk factor')} (at least {rule.min_high})"
    else:
        basis = (
            f"{label}: {_count(intermediate, 'intermediate-risk factor')} "
            f"(at least {rule.min_intermediate})"
        )
    return {"factors": factors, "basis": basis}


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def patient_view(write: PatientWrite, knowledge: Knowledge, patient: Json | None = None) -> Json:
    """The page's data: who, the Explanation, item statuses, rounds and what writing would do."""
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
    contributions = factor_contributions(a, knowledge)
    return {
        "patient": result.patient_reference,
        "header": header(write, patient, knowledge),
        "today": a.now.isoformat(),
        "tier": result.tier if stratified(a) else None,
        "tierLabel": explanation.tier_label if stratified(a) else None,
        "preliminary": a.preliminary,
        "explanation": asdict(explanation),
        "factors": contributions["factors"],
        "tierBasis": contributions["basis"],
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
        "items": {
            "orders": explanation.orders,
            "activities": explanation.activities,
            "total": len(explanation.schedule),
            "line": explanation.counts_line(),
        },
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
    principal = _authenticate(service, {"now"})
    check_fhir_id(id, "Patient id")
    # The token's scopes and patient context: a patient-scoped token sees its patient only.
    require_patient(principal, id, write=False)
    write = service.writeback.assess_patient(id, now=_now(), preview=True)
    patient = service.fhir.read("Patient", id)
    response = jsonify(patient_view(write, service.knowledge, patient))
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


def fetch_names(client: FhirClient, references: Sequence[str]) -> dict[str, str]:
    """The names of the Patients, Organizations and Practitioners referred to, in batch: one
    `_id=a,b,c` search per type (per `IDS_PER_SEARCH` ids), never one read per row. A reference
    the server does not hold, or of another type, is left out (the page shows it as given)."""
    ids: dict[str, dict[str, None]] = {t: {} for t in NAMED_TYPES}
    for reference in references:
        kind, _, rid = reference.partition("/")
        if kind in ids and is_fhir_id(rid):
            ids[kind].setdefault(rid)
    names: dict[str, str] = {}
    for kind, wanted in ids.items():
        chunk_ids = list(wanted)
        for start in range(0, len(chunk_ids), IDS_PER_SEARCH):
            chunk = chunk_ids[start : start + IDS_PER_SEARCH]
            params = {"_id": ",".join(chunk), "_elements": NAMED_TYPES[kind]}
            for resource in client.search(kind, {**params, "_count": str(len(chunk))}):
                name = human_name(resource)
                if name and resource.get("resourceType") == kind:
                    names[f"{kind}/{resource.get('id')}"] = name
    return names


def _days(later: date, earlier: date) -> int:
    return (later - earlier).days


def clinic_row(row: PatientRow, now: date, names: dict[str, str]) -> Json:
    """One patient of the clinic: tier, the most overdue item, counts by status, the next due
    date, and the items (owed first, then done and missed) for the row's expansion."""
    owed = [i for i in row.items if i.status in ("overdue", "due", "upcoming")]
    overdue = sorted((i for i in owed if i.status == "overdue"), key=lambda i: (i.due_end, i.test))
    most: Json | None = None
    if overdue:
        first = overdue[0]
        most = {
            "test": first.test,
            "round": first.round_label,
            "dueEnd": first.due_end,
            "daysOverdue": _days(now, first.due_end_date),
        }
    open_firm = [i for i in owed if i.status in ("due", "upcoming") and not i.conditional]
    next_due = min((i.due_end for i in open_firm), default=None)
    counts = dict.fromkeys(("overdue", "due", "upcoming", "done", "missed"), 0)
    for item in row.items:
        key = "done" if item.status == "done-late" else item.status
        counts[key] = counts.get(key, 0) + 1
    order = {"overdue": 0, "due": 1, "upcoming": 2, "done": 3, "done-late": 3, "missed": 4}
    items = sorted(row.items, key=lambda i: (order.get(i.status, 9), i.due_start, i.test))
    organization = row.organization or NO_VALUE
    practitioner = row.practitioner or NO_VALUE
    return {
        "patient": row.patient,
        "name": names.get(row.patient),
        "tier": row.tier,
        "preliminary": row.preliminary,
        "scope": row.scope,
        "organization": organization,
        "organizationName": names.get(organization, organization),
        "practitioner": practitioner,
        "practitionerName": names.get(practitioner, practitioner),
        "mostOverdue": most,
        "nextDue": next_due,
        "counts": counts,
        "items": [_clinic_item(i) for i in items],
    }


def _clinic_item(item: ItemRow) -> Json:
    return {
        "test": item.test,
        "round": item.round_label,
        "dueStart": item.due_start,
        "dueEnd": item.due_end,
        "status": item.status,
        "consider": item.conditional,
        "doneOn": item.done_on,
    }


def _row_order(row: Json) -> tuple[int, int, str, str]:
    """Most days overdue first, then the nearest next due date, then by name."""
    most = row["mostOverdue"]
    return (
        -(most["daysOverdue"] if most else -1),
        0 if row["nextDue"] else 1,
        row["nextDue"] or "",
        row["name"] or row["patient"],
    )


def clinic_view(
    service: Service,
    population: PopulationConfig,
    now: date,
    start: date,
    limit: int | None = None,
) -> Json:
    """The clinic page's data: one row per patient (with names), the worklist, measure
    summaries per filter, and the MeasureReports."""
    knowledge = service.knowledge
    limit = CLINIC_MAX_PATIENTS if limit is None else limit
    tokens = iim_search_tokens(knowledge, population.finder)
    found = find_iim_patients(service.fhir, tokens)
    rows, failed, out_of_time = _assess(service, found[:limit], now)
    truncated = None
    if out_of_time:
        truncated = {
            "reason": "time",
            "message": f"only {len(rows) + len(failed)} of {len(found)} patients could be"
            " assessed within the request's time limit",
        }
    elif len(found) > limit:
        truncated = {
            "reason": "limit",
            "message": f"{len(found)} patients found; the first {limit} (by id)"
            " are shown. Use `fhir-dm population worklist` for the whole clinic.",
        }
    period = (start, now)
    generated = datetime.now(UTC)
    items = worklist(rows, now, population.worklist.soon_due_days)
    tiers, rounds = _label_maps(knowledge)
    references = [r.patient for r in rows] + [f["patient"] for f in failed]
    references += [ref for r in rows for ref in (r.organization, r.practitioner) if ref]
    names = fetch_names(service.fhir, references)
    patients = sorted((clinic_row(r, now, names) for r in rows), key=_row_order)
    return {
        "today": now.isoformat(),
        "period": {"start": start.isoformat(), "end": now.isoformat()},
        "limit": limit,
        "found": len(found),
        "assessed": len(rows),
        "failed": [{**x, "name": names.get(x["patient"])} for x in failed],
        "truncated": truncated,
        "noValue": NO_VALUE,
        "labels": {"tiers": tiers, "rounds": rounds},
        "names": names,
        "patients": patients,
        "worklist": [
            {
                **asdict(w),
                "name": names.get(w.patient),
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
    principal = _authenticate(service, {"now", "start"})
    # Every IIM patient of the server: user- or system-level scopes only.
    require_population(principal, write=False)
    now = _now()
    start = _date_arg("start") or now - timedelta(days=CLINIC_PERIOD_DAYS)
    if start > now:
        raise InputError("query parameter start is after the evaluation date")
    population = load_population_config(service.knowledge, service.settings.config_dir)
    response = jsonify(clinic_view(service, population, now, start))
    response.headers["Cache-Control"] = "no-store"
    return response
