"""Shared test setup: Hypothesis profiles and helpers to build federations.

Profiles: ``default`` (CI and ``make test``) keeps the suite fast; set
``ARCHIPEL_HYPOTHESIS_PROFILE=thorough`` for long property runs. Deadlines are
off everywhere: tests assert behaviour, benchmarks measure speed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("ARCHIPEL_HYPOTHESIS_PROFILE", "default"))
