"""The front doors: the Python API (``api``), the CLI and its commands, bench, compare, conformance, serve.

Only ``api`` reaches into ``graphopt.backends``; every other front door calls the API (checked by
tests/test_layout.py).
"""
