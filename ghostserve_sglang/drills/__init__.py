"""Faults caused on purpose, for testing (only with ``--ghost-enable-fault-injection``): ``process``
ends or stops a rank's process at a chosen moment; ``kv`` destroys KV, corrupts parity, pauses the drain.
They act on the objects they are given and know nothing of the layers above.

May import: settings, logs, store, codec, shm.
"""
