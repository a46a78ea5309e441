# oauth-relay container image (basic; issue #6 adds the compose file, secrets docs and lint).
# Not built on the project's CI machines (no container engine there).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /wheels

FROM python:3.12-slim
RUN useradd --system --uid 10025 --home-dir /var/spool/oauth-relay --shell /usr/sbin/nologin relay \
    && mkdir -p /var/spool/oauth-relay /etc/oauth-relay \
    && chown relay:relay /var/spool/oauth-relay && chmod 0700 /var/spool/oauth-relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
ENV RELAY_CONFIG=/etc/oauth-relay/relay.toml \
    RELAY_SPOOL__PATH=/var/spool/oauth-relay \
    PYTHONUNBUFFERED=1
USER relay
VOLUME ["/var/spool/oauth-relay"]
EXPOSE 2525 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["oauth-relay"]
CMD ["serve"]
