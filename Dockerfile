# Three images from one file, one per role:
#   --target lookup   the lookup service only: serving/, sql/ and common/, no batch or console code, no Airflow
#   --target console  the operator console (the dashboard): console/, sql/ and common/
#   --target airflow  Airflow 3 with overnight installed, for every Airflow service and worker
#
# lookup and console install the locked dependencies first (a layer that changes only with uv.lock), then
# the project from the folders copied. pyproject.toml lists every package (jobs, serving, console, sql, common);
# hatchling builds the wheel from the ones present and leaves the absent ones out, so an image holds only
# its role's code. The entry points of the roles left out (`overnight`, `overnight-console` in lookup)
# are removed so that nothing in the image points at code it does not have (in airflow too: no console).
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS lookup
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PATH="/opt/overnight/.venv/bin:$PATH"
RUN pip install --no-cache-dir uv==0.13.9 && useradd --create-home --uid 50000 overnight
WORKDIR /opt/overnight
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY serving serving
COPY sql sql
COPY common common
RUN uv sync --locked --no-dev && rm .venv/bin/overnight .venv/bin/overnight-console
USER overnight
EXPOSE 8000
CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8000"]

FROM python:${PYTHON_VERSION}-slim AS console
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PATH="/opt/overnight/.venv/bin:$PATH"
RUN pip install --no-cache-dir uv==0.13.9 && useradd --create-home --uid 50000 overnight
WORKDIR /opt/overnight
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY console console
COPY sql sql
COPY common common
RUN uv sync --locked --no-dev && rm .venv/bin/overnight .venv/bin/overnight-serve
USER overnight
EXPOSE 8001
CMD ["python", "-m", "console", "--host", "0.0.0.0", "--port", "8001"]

FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS airflow
# A C compiler for the workers: scoring compiles the ranker with tl2cgen and gcc (jobs/predictor.py);
# without one it falls back to LightGBM's slower predict, with a warning.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
USER airflow
COPY --chown=airflow:root pyproject.toml uv.lock README.md /opt/overnight/
COPY --chown=airflow:root jobs /opt/overnight/jobs
COPY --chown=airflow:root serving /opt/overnight/serving
COPY --chown=airflow:root sql /opt/overnight/sql
COPY --chown=airflow:root common /opt/overnight/common
# Install overnight next to the image's own Airflow, never upgrading or downgrading it; the console is
# its own image, so its entry point goes.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "/opt/overnight[batch]" \
    && rm "$(command -v overnight-console)"
COPY --chown=airflow:root dags /opt/airflow/dags
