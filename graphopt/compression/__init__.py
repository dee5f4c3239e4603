"""Compression that knows no target: calibration, real-label evaluation, quantization and pruning drivers,
the accuracy budget and the configuration search. Imports the floor (``graphopt.core``) and ``graphopt.passes``,
never ``graphopt.front`` or ``graphopt.backends`` (checked by tests/test_layout.py).
"""
