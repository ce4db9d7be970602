"""Benchmarks that drive the whole app (the core's own speed benchmark is `python -m lstm_core.bench`)."""
