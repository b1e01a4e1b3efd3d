"""The differential suite against the reference implementation (see oracle.py)."""
