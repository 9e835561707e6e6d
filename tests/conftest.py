"""Shared fixtures. Backend-specific fixtures live next to the tests that use them."""
