from tests.utils.api import api_harness


def test_healthz_answers_without_a_key(sqlite_engine):
    with api_harness(sqlite_engine) as api:
        assert api.client.get("/healthz").json() == {"status": "ok"}


def test_readyz_names_what_is_unreachable(sqlite_engine):
    with api_harness(sqlite_engine, temporal_address="127.0.0.1:1") as api:
        response = api.client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "ok" and body["temporal"].startswith("unreachable")


async def test_readyz_is_ready_against_a_real_temporal(sqlite_engine, dev_server_env):
    from httpx import ASGITransport, AsyncClient

    from api.app import create_app
    from tests.utils.api import settings_for_tests

    target = dev_server_env.client.service_client.config.target_host
    app = create_app(settings_for_tests(temporal_address=target), sqlite_engine)
    async with (
        app.router.lifespan_context(app),
        AsyncClient(transport=ASGITransport(app=app), base_url="http://api") as client,
    ):
        response = await client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "database": "ok", "temporal": "ok"}


def test_unknown_route_is_a_json_404(sqlite_engine):
    with api_harness(sqlite_engine) as api:
        response = api.client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
