"""Benchmarks that compare compression methods: arms (one method each) and the suites over them."""
