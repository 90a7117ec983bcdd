# syntax=docker/dockerfile:1
# Build the wheels in one stage; the runtime stage gets only the installed package.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY handlers ./handlers
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PORT=8000 \
    BRIDGE_DATABASE_URL=sqlite:////data/bridge.db \
    BRIDGE_USER=bridge \
    BRIDGE_DATA_DIR=/data
RUN useradd --system --uid 10001 --home-dir /data bridge \
    && mkdir -p /data && chown bridge:bridge /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY --chmod=755 deploy/entrypoint.sh /usr/local/bin/bridge-entrypoint
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
# No USER: Fly and Render mount the volume over /data owned by root. The entrypoint starts
# as root only to give /data to BRIDGE_USER, then runs the command as that user for good.
ENTRYPOINT ["bridge-entrypoint"]
CMD ["millimetric-bridge", "serve"]
