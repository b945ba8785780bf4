# Sluice broker: listens on 0.0.0.0:7700, data under /data, runs as an unprivileged user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SLUICE_HOST=0.0.0.0 \
    SLUICE_PORT=7700 \
    SLUICE_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY broker ./broker
COPY client ./client
COPY bench ./bench
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sluice \
    && mkdir -p /data \
    && chown sluice /data

USER sluice
VOLUME ["/data"]
EXPOSE 7700 7701
ENTRYPOINT ["sluice-broker"]
