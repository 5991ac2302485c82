"""Benchmarks that print figures (decode speed, ...); the CLI `unmask bench` calls into them."""
