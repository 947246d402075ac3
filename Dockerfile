# fhir-dm web service image: gunicorn serving fhir_dm.web.wsgi:app on port 8080.
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fhir_dm ./fhir_dm
COPY config ./config
COPY profiles ./profiles
RUN pip install --no-cache-dir -e . \
    && useradd --system --uid 10001 --home /app fhirdm \
    && mkdir -p /var/lib/fhir-dm && chown fhirdm /var/lib/fhir-dm

USER fhirdm
ENV FHIR_DM_CONFIG_DIR=/app/config \
    FHIR_DM_LOCK_DIR=/var/lib/fhir-dm/locks
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"
# No gunicorn access log: its request line holds patient ids; the service logs each request
# itself, by route, without them.
CMD ["gunicorn", "--workers", "2", "--bind", "0.0.0.0:8080", "fhir_dm.web.wsgi:app"]
