"""The sans-IO core: every decision ray_quota makes, with no Ray, asyncio, wall clock or pydantic.

Each class here takes ``now`` (or a clock) from its caller and answers with values, so the
executor and broker actors, the scale model and the tests all drive the same code. A test
imports this package in a fresh interpreter and checks that neither Ray nor pydantic loads.
"""
