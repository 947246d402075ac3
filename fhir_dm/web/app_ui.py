"""The clinician's view: a SMART on FHIR app (static pages) and the one JSON endpoint it reads.

The pages are static files (`static/`); the SMART launch and the OAuth 2 flow with PKCE run in
the browser with the `fhirclient` library. The app reads its data from `POST
/app/api/Patient/{id}/view`, which previews the patient's assessment through the same write-back
preview as `$dm-cancer-screening?preview=true` and returns the core's Explanation with each
item's status, so the page and every other output render one structure. Writing goes through
the service's own `$dm-cancer-screening` operation, with the clinician's token.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import UTC, date, datetime
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request, send_from_directory

from fhir_dm.errors import InputError
from fhir_dm.web.settings import Service, current_service
from fhir_dm.writeback import PatientWrite

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


def _now() -> date:
    raw = request.args.get("now")
    if raw is None:
        return datetime.now(UTC).date()
    if not _DATE.fullmatch(raw):
        raise InputError("query parameter now must be a full date (YYYY-MM-DD)")
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InputError("query parameter now is not a valid date") from None


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
