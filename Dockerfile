# filedock container image. Build (see docs/deploy.md):
#   docker build -t filedock:0.1.0 .
#   buildah build --format docker -t filedock:0.1.0 .
# BASE must be a Debian-based image with python3 (>= 3.11) and its venv module on PATH.
ARG BASE=python:3.11-slim-bookworm

# checkov:skip=CKV_DOCKER_7:BASE is an ARG whose default is the pinned python:3.11-slim-bookworm
FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY service ./service
# pip compiles the .pyc files here: the runtime root filesystem is read-only.
# Behind a TLS-inspecting proxy, pass its CA bundle as the optional build secret
# `pip-ca` (--secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt); it is only
# mounted for this step and never stored in the image.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/filedock --help >/dev/null \
    && /opt/venv/bin/python -c "from importlib.resources import files as f; ui = f('service.face.ui'); \
assert (ui / 'templates' / 'layout.html').is_file() and (ui / 'static' / 'htmx.min.js').is_file()"

FROM ${BASE}
ARG VERSION=0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="filedock" \
      org.opencontainers.image.description="Event-driven file-intake service: claim, import, archive, never lose a file." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md"

# tini is PID 1: it passes signals on to filedock and reaps the zombies that an
# importer's orphaned grandchildren would otherwise leave until the container restarts.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed, numeric, non-root identity: Kubernetes' runAsNonRoot can only verify a
# numeric USER, and the data volume's ownership (fsGroup) is planned around it.
RUN groupadd --gid 10001 filedock \
    && useradd --no-log-init --uid 10001 --gid 10001 \
        --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin filedock \
    && mkdir -p /data /etc/filedock \
    && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv
COPY examples /opt/filedock/examples
COPY deploy/image/config.yaml /etc/filedock/config.yaml

# Writes go only to /data (the volume) and /tmp: the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /data
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FILEDOCK_HTTP__PORT', '9100'), timeout=4)"]
# Exec form, under tini: filedock gets each SIGTERM tini receives (first signal: graceful
# drain within shutdown_grace_s; second: forced), and tini exits with filedock's code.
ENTRYPOINT ["tini", "--", "filedock"]
CMD ["run", "--config", "/etc/filedock/config.yaml"]
