"""The floor every stage stands on: errors, ONNX I/O, output safety, verification, shapes, the pass manager.

Modules here import only each other (and onnx/onnx_ir/numpy): never ``graphopt.compression``,
``graphopt.front`` or ``graphopt.backends`` (checked by tests/test_layout.py).
"""
