# Multi-stage: build a wheel with the full toolchain, run it on a slim image as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane ./controlplane
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin controlplane
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001:10001
# Mount the policy repository checkout here (read-only is enough).
VOLUME ["/policy"]
EXPOSE 18000 9902
STOPSIGNAL SIGTERM
ENTRYPOINT ["controlplane"]
# In a container the admin port must be reachable by probes and Prometheus, so it binds all
# interfaces here; outside a container the default stays loopback. Keep 9902 off public networks.
CMD ["serve", "--policy", "/policy", "--xds-address", "0.0.0.0:18000", "--admin-address", "0.0.0.0:9902"]
