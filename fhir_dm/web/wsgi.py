"""WSGI entry point: `gunicorn 'fhir_dm.web.wsgi:app'` builds the app from FHIR_DM_* settings."""

from __future__ import annotations

from fhir_dm.web.app import create_app

app = create_app()
