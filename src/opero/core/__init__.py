"""Policies: they decide (call now, wait this long, give up) and never sleep or do I/O."""
