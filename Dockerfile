# The gateway as a container: `docker build -t foreign-layer-proxy .`, then
#   docker run -p 5000:5000 -p 127.0.0.1:9090:9090 \
#     -e FOREIGN_LAYER_PROXY_UPSTREAM_URL=http://registry:5000 foreign-layer-proxy
# or mount a config of your own at /etc/foreign-layer-proxy/config.yaml (the image carries the
# reference, `foreign-layer-proxy config example`; check yours with `config check --config FILE`).

FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml setup.cfg LICENSE ./
COPY proxy ./proxy
# Wheels of the gateway and all its dependencies, so the final stage needs no compiler or source.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FOREIGN_LAYER_PROXY_ADMIN_LISTEN=0.0.0.0:9090 \
    FOREIGN_LAYER_PROXY_STORE_URL=sqlite:////var/lib/foreign-layer-proxy/foreign-layers.db
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "$(ls /wheels/foreign_layer_proxy-*.whl)[speed]" \
    && groupadd --system --gid 10001 foreign-layer-proxy \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin foreign-layer-proxy \
    && install -d -o foreign-layer-proxy -g foreign-layer-proxy /var/lib/foreign-layer-proxy \
    && install -d /etc/foreign-layer-proxy \
    && foreign-layer-proxy config example > /etc/foreign-layer-proxy/config.yaml
VOLUME /var/lib/foreign-layer-proxy
USER 10001:10001
EXPOSE 5000 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
ENTRYPOINT ["foreign-layer-proxy"]
CMD ["serve", "--config", "/etc/foreign-layer-proxy/config.yaml"]
