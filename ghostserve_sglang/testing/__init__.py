"""Harness code shared by the tests, the benchmarks and the device checks: never imported by the
product. It may import anything in the package; nothing in the package imports it.

May import: anything.
"""
