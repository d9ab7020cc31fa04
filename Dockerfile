# controlplane's container image: `make image` builds it, docs/deploying-image.md says how to run it, and
# tests/test_image_runtime.py runs this file's final stage (its user, working directory, environment, volumes,
# ports, command and HEALTHCHECK) without a container engine, with a real Envoy.
#
# Build stage: the project and every dependency at the version pinned in constraints.txt, in a virtual environment
# that the final stage copies whole (the same base image, so the same interpreter path).
FROM python:3.11-slim AS build
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN python -m venv /opt/controlplane \
 && /opt/controlplane/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
# The runtime user owns its working directory and the state volume, and nothing else: the code and the policy are
# read-only to it. uid/gid 10001, so a Kubernetes runAsUser / fsGroup can name it.
RUN groupadd --system --gid 10001 controlplane \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/controlplane --create-home \
    --shell /usr/sbin/nologin controlplane \
 && mkdir -p /var/lib/controlplane /policy \
 && chown 10001:10001 /var/lib/controlplane \
 && chmod 0700 /var/lib/controlplane
COPY --from=build /opt/controlplane /opt/controlplane
# Every listener from the environment (a `serve` flag still wins). The xDS, admin and exchange ports bind every
# interface: probes, Prometheus and the gateways reach them from other pods; keep the admin port (9902) off public
# networks. Gateways dial the exchange at CONTROLPLANE_EXCHANGE_PUBLIC_ADDRESS (set it: this container's 0.0.0.0
# means nothing to them). Webhooks are off until CONTROLPLANE_WEBHOOK_ADDRESS (e.g. 0.0.0.0:9903) and a secret are
# given. CONTROLPLANE_STATE_DIR is the state volume: signing keys, deny list, pins, audit trail.
ENV PATH=/opt/controlplane/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/controlplane \
    CONTROLPLANE_POLICY=/policy \
    CONTROLPLANE_STATE_DIR=/var/lib/controlplane \
    CONTROLPLANE_XDS_ADDRESS=0.0.0.0:18000 \
    CONTROLPLANE_ADMIN_ADDRESS=0.0.0.0:9902 \
    CONTROLPLANE_EXCHANGE_ADDRESS=0.0.0.0:9904
WORKDIR /home/controlplane
USER 10001:10001
# /policy: the policy directory (a checkout or a ConfigMap; read-only is enough). /var/lib/controlplane: the
# state, which must outlive the container (with --store postgres only the lock file is kept there).
VOLUME ["/policy", "/var/lib/controlplane"]
# xDS (gRPC), admin HTTP (/healthz, /readyz, /metrics, /status), webhooks, token exchange.
EXPOSE 18000 9902 9903 9904
# The admin listener named by CONTROLPLANE_ADMIN_ADDRESS, asked on loopback; no shell and no curl needed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["controlplane", "healthcheck"]
# serve drains on SIGTERM: new streams refused, open ones told to reconnect elsewhere, state written, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["controlplane"]
CMD ["serve"]
