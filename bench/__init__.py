"""Benchmarks of ray_quota against the limiters people use instead; run ``python -m bench``."""
