"""Protecting the KV cache of one scheduler rank: the capture of each step's KV writes, the column
exchange over GhostServe's own collectives, the fused gather and encode kernels, the worker that hands
parity to the store's drain, the rebuild of lost KV from parity, the scrub, and what a rank reports.

May import: settings, logs, metrics, control, store, codec, threads, shm.
"""
