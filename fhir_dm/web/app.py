"""The Flask app factory: settings in, a service with its blueprints and error handlers out."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import requests
from flask import Flask

from fhir_dm.cds.replay import ReplayGuard
from fhir_dm.cds.state import StateSettings, open_replay
from fhir_dm.fhir.client import client_from_config
from fhir_dm.web import (
    app_ui,
    cds_hooks,
    limits,
    logs,
    metrics,
    notifications,
    operations,
    outcomes,
    population_ops,
    system,
)
from fhir_dm.web.jobs import queue_for
from fhir_dm.web.settings import EXTENSION_KEY, Service, Settings, load_engine, load_settings
from fhir_dm.web.trust import InboundAuth
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack


def create_app(settings: Settings | None = None) -> Flask:
    """Build the service; without `settings`, read them from FHIR_DM_* variables.

    Everything long-lived (knowledge, engine, FHIR client, inbound auth, locks) is built here,
    once, and kept in `app.extensions["fhir_dm"]` as a typed `Service`; CDS Hooks is added when
    `settings.cds` is set. A bad configuration raises KnowledgeError here, so the service never
    starts half-configured.
    """
    settings = settings if settings is not None else load_settings()
    logs.configure_logging(settings.log_level)
    knowledge, engine = load_engine(settings)
    fhir = client_from_config(settings.fhir)
    locks = PatientLocks(settings.lock_dir)
    service = Service(
        settings=settings,
        knowledge=knowledge,
        engine=engine,
        fhir=fhir,
        auth=InboundAuth(
            settings.trust,
            session=requests.Session(),
            replay=_replay(settings),
            fhir_base_url=settings.fhir.base_url,
        ),
        locks=locks,
        writeback=WriteBack(fhir, engine, locks),
        capability_statement=system.build_capability_statement(
            settings, knowledge, started=datetime.now(UTC)
        ),
    )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions[EXTENSION_KEY] = service
    logs.init_app(app)
    metrics.init_app(app)
    limits.init_app(app)
    outcomes.init_app(app)
    app.register_blueprint(system.bp)
    app.register_blueprint(operations.bp)
    population_ops.init_app(app)
    app_ui.init_app(app)
    jobs = settings.jobs
    if jobs is not None and jobs.notification_secret is not None:
        # The endpoint only enqueues; `fhir-dm worker` runs the re-assessments.
        queue = queue_for(settings, jobs)
        notifications.init_app(app, queue)
    if settings.cds is not None:
        cds = settings.cds
        if cds.config_file is None and settings.config_dir is not None:
            # cds.yaml lives with the rest of the knowledge base unless named on its own.
            cds = cds.model_copy(update={"config_file": Path(settings.config_dir) / "cds.yaml"})
        cds_hooks.init_app(
            app,
            cds,
            engine=engine,
            knowledge=knowledge,
            plan_writer=cds_hooks.PlanWriter(service.writeback, fhir.base_url),
            app_launch_url=settings.public_base_url + app_ui.LAUNCH_PATH,
        )
    return app


def _replay(settings: Settings) -> ReplayGuard | None:
    """The operations' `jti` store: shared by every worker (and host, with Redis).

    It is the CDS Hooks state when CDS Hooks is configured, else the default SQLite file, so a
    token is accepted once whichever worker or endpoint it reaches.
    """
    if settings.trust.mode != "jwt":
        return None
    state = settings.cds.state if settings.cds is not None else StateSettings()
    return open_replay(state, leeway_seconds=settings.trust.leeway_seconds)
