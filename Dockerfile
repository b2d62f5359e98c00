# Shuttle image: the `shuttle` CLI, the Celery worker and Flower all run from it.
#   docker build -t shuttle .
#   docker run --rm shuttle                # shuttle --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Fixed uid/gid so volumes and the k8s securityContext (runAsUser 10001) agree.
RUN groupadd --system --gid 10001 shuttle \
 && useradd --system --uid 10001 --gid shuttle --create-home --home-dir /home/shuttle shuttle

WORKDIR /app

# README.m[d]: copied when present (pyproject's `readme =` needs it), skipped otherwise.
COPY pyproject.toml README.m[d] ./
COPY common/ common/
COPY producer/ producer/
COPY worker/ worker/
COPY ops/ ops/

# Database drivers must come as binary wheels (psycopg[binary]), so no compiler or libpq-dev here.
RUN pip install --no-cache-dir . \
 && shuttle --help >/dev/null

# Shared path for the model-files migration. Created here, owned by `shuttle`, so a fresh named
# volume mounted on it inherits that ownership and the non-root worker can read it.
RUN mkdir -p /data/models /data/flower && chown shuttle:shuttle /data/models /data/flower

USER shuttle

CMD ["shuttle", "--help"]
