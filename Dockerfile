# OffloadMQ server (and agent) image. Build: docker build -t offloadmq .
# Server: docker run -p 3069:3069 -v offloadmq-data:/data offloadmq
# Agent:  docker run offloadmq python /app/offload_agent.py serve ...  (see README, "Deploying")
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SERVER_ADDRESS=0.0.0.0:3069 \
    DATABASE_ROOT_PATH=/data

# An unprivileged account owns the data folder; nothing runs as root.
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin offloadmq \
 && mkdir -p /data \
 && chown offloadmq:offloadmq /data

WORKDIR /app
COPY setup.cfg pyproject.toml README.md LICENSE offloadmq.py offload_agent.py ./
COPY static ./static
# The postgres extra adds the PostgreSQL driver; without OFFLOADMQ_STORE it stays unused.
RUN pip install --no-cache-dir '.[postgres]'

USER offloadmq
VOLUME ["/data"]
EXPOSE 3069
# Liveness only: a standby is alive too (readiness, /health/ready, is for load balancers).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:3069/health', timeout=2).status != 200)"]
# Run from /app so the console (static/) is served beside the code.
CMD ["python", "/app/offloadmq.py"]
