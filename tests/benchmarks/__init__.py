"""Benchmarks, never part of the test run.

``python -m tests.benchmarks [ledger|postgres|gateway|all]``
"""
