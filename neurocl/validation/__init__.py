"""Validation suites: neurocl's objectives reproduce the results they rest on (issue #8)."""
