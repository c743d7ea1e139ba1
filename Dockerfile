# apikeyd in a container. Build:  docker build -t apikeyd .
# Run (SQLite on a volume):      docker run -d -p 50051:50051 -v apikeyd-data:/data apikeyd
# Every setting is an APIKEYD_* variable (docker run -e ...); README.md, "Container", has more.
# tests/test_container.py runs the command this image runs, with these ENV values.

# Builder: the wheel and every dependency installed into a virtualenv, copied whole into the final stage.
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/apikeyd
WORKDIR /build
COPY pyproject.toml README.md ./
COPY src ./src
# The `server` extra (a plain install of the wheel is the client library only), and `tracing`, so that
# APIKEYD_TRACING=otlp works in the image without a rebuild; with tracing off none of it is imported.
RUN /opt/apikeyd/bin/pip wheel --no-deps --wheel-dir /build/dist . \
    && /opt/apikeyd/bin/pip install "$(ls /build/dist/apikeyd-*.whl)[server,tracing]"

# Final: the same Python, the virtualenv, no build tools, a user without rights.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 apikeyd \
    && useradd --system --uid 10001 --gid apikeyd --home-dir /data --no-create-home --shell /usr/sbin/nologin apikeyd \
    && mkdir /data \
    && chown apikeyd:apikeyd /data
COPY --from=builder /opt/apikeyd /opt/apikeyd
ENV PATH=/opt/apikeyd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    APIKEYD_LISTEN=0.0.0.0:50051 \
    APIKEYD_METRICS_LISTEN=0.0.0.0:9464 \
    APIKEYD_EXT_AUTHZ_LISTEN=0.0.0.0:50052 \
    APIKEYD_DATABASE_URL=sqlite:////data/apikeyd.db
# The SQLite file lives here; with PostgreSQL the volume stays empty.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
# gRPC, Envoy's ext_authz over HTTP, and the Prometheus metrics port.
EXPOSE 50051 50052 9464
# `apikeyd health` asks grpc.health.v1 Check at APIKEYD_ADDRESS (default 127.0.0.1:50051): exit 0 when SERVING.
# With TLS on, give it APIKEYD_CLIENT_TLS_CA (and _SERVER_NAME, and _CERT/_KEY for mTLS): README.md, "Container".
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["apikeyd", "health"]
# Exec form: apikeyd is PID 1 and gets SIGTERM itself (docker stop), drains and exits 0.
ENTRYPOINT ["apikeyd"]
CMD ["serve"]
