# Two images from one file:
#   --target lookup   the lookup service only (no Airflow), small
#   --target airflow  Airflow 3 with overnight installed, for every Airflow service and worker
ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS lookup
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy PATH="/opt/overnight/.venv/bin:$PATH"
RUN pip install --no-cache-dir uv==0.13.9 && useradd --create-home --uid 50000 overnight
WORKDIR /opt/overnight
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-dev --no-install-project
COPY jobs jobs
COPY serving serving
COPY sql sql
RUN uv sync --locked --no-dev
USER overnight
EXPOSE 8000
CMD ["overnight", "serve", "--host", "0.0.0.0", "--port", "8000"]

FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION} AS airflow
COPY --chown=airflow:root pyproject.toml uv.lock README.md /opt/overnight/
COPY --chown=airflow:root jobs /opt/overnight/jobs
COPY --chown=airflow:root serving /opt/overnight/serving
COPY --chown=airflow:root sql /opt/overnight/sql
# Install overnight next to the image's own Airflow, never upgrading or downgrading it.
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" "/opt/overnight[batch]"
COPY --chown=airflow:root dags /opt/airflow/dags
