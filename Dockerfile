# The product image: the same code `journeys dev` runs, for the API and the worker.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY core core
COPY store store
COPY providers providers
COPY activities activities
COPY workflows workflows
COPY api api
COPY migrations migrations
COPY templates templates
COPY cli.py worker.py devstack.py alembic.ini ./
RUN pip install --no-cache-dir .
RUN useradd --create-home journeys
USER journeys
EXPOSE 8000
CMD ["journeys", "api", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
