"""Helpers shared by the test tiers (tests/cluster, tests/e2e); no tests live here."""
