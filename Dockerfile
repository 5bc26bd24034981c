# trickserve image: the API, the workers and the migration job all run from it (docker-compose.yml).
# TORCH_INDEX picks the PyTorch build: the CPU wheels by default; for GPU workers build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TRICKSERVE_HOME=/data

WORKDIR /app
RUN pip install "torch>=2.10" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY migrations ./migrations
RUN pip install -e . \
    && useradd --create-home --uid 10001 trickserve \
    && mkdir -p /data && chown trickserve /data
USER trickserve
VOLUME ["/data"]
EXPOSE 8000
CMD ["trickserve", "api", "--host", "0.0.0.0", "--port", "8000"]
