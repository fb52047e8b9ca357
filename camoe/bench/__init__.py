"""Benchmarks that print and save figures (``camoe bench quality|scoring|freshness``).
They stand beside the product: only the CLI imports them."""
