"""Unit-test settings: hypothesis runs reproducibly (the same examples every run, no example database)."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=False)
settings.load_profile("ci")
