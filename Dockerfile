# fhir-dm web service image: `fhir-dm serve` (gunicorn) on port 8080, installed from the wheel.
#   docker build -t fhir-dm .
#   docker run -p 8080:8080 -e FHIR_DM_FHIR__BASE_URL=... -e FHIR_DM_TRUST__... fhir-dm
# Settings: docs/settings.md. The bundled knowledge base is inside the wheel; mount a site's
# own and set FHIR_DM_CONFIG_DIR to use it instead.

# --- build: the wheel, exactly as CI builds it ---------------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN pip install "build>=1.2"
COPY pyproject.toml README.md LICENSE ./
COPY fhir_dm ./fhir_dm
COPY config ./config
COPY profiles ./profiles
RUN python -m build --wheel --outdir /dist .

# --- runtime: the wheel and its dependencies, nothing else ---------------------------------
FROM python:3.11-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /dist /tmp/dist
RUN pip install /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/fhir-dm --create-home fhirdm

USER fhirdm
WORKDIR /var/lib/fhir-dm
# Per-patient lock files: shared by every worker of this container.
ENV FHIR_DM_LOCK_DIR=/var/lib/fhir-dm/locks
EXPOSE 8080
# Liveness only (/healthz): readiness, which needs the FHIR server, is /readyz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
# gunicorn becomes PID 1 (fhir-dm serve checks the settings, then execs it); no access log.
CMD ["fhir-dm", "serve", "--bind", "0.0.0.0:8080"]
