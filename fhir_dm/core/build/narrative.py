"""XHTML narrative of the CarePlan: what a clinician sees in any EHR that shows resource text."""

from __future__ import annotations

from html import escape

from fhir_dm.core.explain import Explanation

XHTML_NS = "http://www.w3.org/1999/xhtml"


def _list(title: str, items: tuple[str, ...]) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{escape(i)}</li>" for i in items)
    return f"<p><b>{escape(title)}</b></p><ul>{lis}</ul>"


def render_narrative(explanation: Explanation, window: str) -> str:
    """The CarePlan.text.div: tier, reasons, schedule table (each item's status on the day of
    the assessment), missed items, unknowns, version."""
    e = explanation
    rows = []
    for r in e.schedule:
        what = escape(r.test)
        if r.consider:
            what = f"<i>Consider</i>: {what}" + (
                f" <i>({escape(r.condition)})</i>" if r.condition else ""
            )
        if r.not_imacs:
            what += " <i>(not IMACS)</i>"
        due = f"{escape(r.due_start)} to {escape(r.due_end)}"
        status = f"<b>{escape(r.status)}</b>" if r.status == "overdue" else escape(r.status)
        if r.evidence:
            status += f" ({escape(r.evidence)})"
        rows.append(
            f"<tr><td>{escape(r.round_label)}</td><td>{what}</td><td>{due}</td>"
            f"<td>{status}</td><td>{escape(r.rules)}</td></tr>"
        )
    table = (
        "<table><thead><tr><th>When</th><th>Test</th><th>Due</th><th>Status</th>"
        "<th>Rule</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No tests are proposed.</p>"
    )
    parts = [
        f'<div xmlns="{XHTML_NS}">',
        f"<h3>IIM cancer screening: {escape(e.headline)}</h3>",
        f"<p><b>Screening window</b>: {escape(window)}.</p>",
        _list("Dates used", e.dates),
        _list("Notices", e.notices),
        _list("Why", e.reasons),
        f"<p>{escape(e.counts_line())}.</p>" if e.schedule else "",
        table,
        _list("Missed (no longer owed)", e.missed),
        _list("Not recorded (unknown, not negative)", e.unknown_facts),
        _list("Input not used", e.findings),
        _list("Evidence (rule; level; sources)", e.evidence),
        f"<p>Rule set {escape(e.ruleset)}; {escape(e.guideline)}. "
        "Every item is a proposal for a clinician to review.</p>",
        "</div>",
    ]
    return "".join(parts)


def render_risk_narrative(explanation: Explanation) -> str:
    """RiskAssessment.text.div: the headline and the reasons."""
    e = explanation
    return "".join(
        [
            f'<div xmlns="{XHTML_NS}">',
            f"<p><b>{escape(e.headline)}</b></p>",
            _list("Why", e.reasons),
            _list("Notices", e.notices),
            f"<p>Rule set {escape(e.ruleset)}.</p>",
            "</div>",
        ]
    )


def render_request_narrative(test: str, round_label: str, due: str, notes: list[str]) -> str:
    """ServiceRequest.text.div: what, when, and why."""
    items = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return (
        f'<div xmlns="{XHTML_NS}"><p><b>{escape(test)}</b> ({escape(round_label)}), '
        f"due {escape(due)}. A proposal for a clinician.</p><ul>{items}</ul></div>"
    )
