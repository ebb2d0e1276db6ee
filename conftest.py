"""Doctests of the packages run with the same setup as the tests (8 CPU devices)."""

from tests.conftest import *  # noqa: F403
