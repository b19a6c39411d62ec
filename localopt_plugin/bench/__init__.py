"""Benchmarks that back the plugin's speed and memory claims (``localopt-bench``)."""
