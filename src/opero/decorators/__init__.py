"""The two public decorators."""
