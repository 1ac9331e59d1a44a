"""Shared test setup: deterministic hypothesis, torch as the oracle."""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Derandomized by default (and always in CI); HYPOTHESIS_PROFILE=dev explores new examples.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
