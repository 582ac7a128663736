# One image for every Tollgate process; the compose file picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# PyPI's default torch brings CUDA libraries (GPU workers need them). For CPU-only images pass a
# CPU wheel index: --build-arg TORCH_INDEX_URL=<your CPU wheel index>.
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then pip install --index-url "$TORCH_INDEX_URL" torch; else pip install torch; fi
COPY pyproject.toml README.md ./
COPY ledger ledger
COPY streams streams
COPY storage storage
COPY gateway gateway
COPY inference inference
COPY migrations migrations
COPY tollgate tollgate
COPY alembic.ini ./
RUN pip install .
# What a process keeps (var/tollgate under the working directory: processor state, spools, faust data) and
# the checkpoint signing key's volume (docker-compose.yml) belong to the user the processes run as.
RUN useradd --create-home tollgate \
    && mkdir -p /app/var/tollgate /var/lib/tollgate/audit \
    && chown -R tollgate /app/var /var/lib/tollgate
USER tollgate
ENTRYPOINT ["tollgate"]
