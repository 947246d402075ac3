"""The job queue as the service and `fhir-dm worker` open it, from the service's settings.

One place builds it, so every process that enqueues or runs a task has the same tasks
registered: the queue (`fhir_dm.events.queue`) knows no edge, and the population run adds its
task here.
"""

from __future__ import annotations

import os
from pathlib import Path

from fhir_dm.common.errors import KnowledgeError
from fhir_dm.core.identifiers import Identity
from fhir_dm.events.queue import Jobs, Runtime, open_huey_checked
from fhir_dm.events.settings import JobsSettings
from fhir_dm.fhir.client import client_from_config
from fhir_dm.knowledge.load import CONFIG_DIR_VARIABLE
from fhir_dm.population.queued import register_population_task
from fhir_dm.web.settings import Settings, load_engine, load_settings
from fhir_dm.writeback.locks import PatientLocks
from fhir_dm.writeback.writer import WriteBack


def build_runtime(settings: Settings) -> Runtime:
    """The worker's long-lived objects, built like the web service's from the same settings."""
    knowledge, engine = load_engine(settings)
    fhir = client_from_config(settings.fhir)
    writeback = WriteBack(fhir, engine, PatientLocks(settings.lock_dir))
    series = Identity(knowledge.ruleset.canonical_base, "", "").series_system
    return Runtime(writeback, fhir, series, knowledge)


def queue_for(settings: Settings, jobs: JobsSettings) -> Jobs:
    """The queue with every edge's task registered; QueueUnavailableError (503) when its
    storage cannot be opened."""
    queue = Jobs(open_huey_checked(jobs), jobs, lambda: build_runtime(settings))
    register_population_task(queue)
    return queue


def open_jobs(config: Path | None = None) -> tuple[Jobs, Settings]:
    """The queue and the service's settings, for a command line (`--config` names the
    knowledge base); KnowledgeError when `jobs` is not configured."""
    if config is not None:
        os.environ[CONFIG_DIR_VARIABLE] = str(config)
    settings = load_settings()
    if settings.jobs is None:
        raise KnowledgeError("settings: jobs is not configured (e.g. FHIR_DM_JOBS__BACKEND)")
    return queue_for(settings, settings.jobs), settings
