"""Command-line test fixtures: the API test fixtures (a real uvicorn server on the test's own SQLite file), reused
so that the client commands talk to the same server the API tests exercise."""

from tests.api.conftest import enqueue, make_app, make_server, make_settings, migrated_template, sessions, settings

__all__ = ["enqueue", "make_app", "make_server", "make_settings", "migrated_template", "sessions", "settings"]
