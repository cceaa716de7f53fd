"""Helpers for testing code that uses ray_quota: a fake LLM provider with a hidden limit."""

from ray_quota.testing.fake_provider import FakeProvider

__all__ = ["FakeProvider"]
