"""What GhostServe installs into SGLang: the plugin SGLang loads in every process, the one table of
patch targets and the releases it is declared for, the thin wrappers it installs (and the state they
share), the compatibility checks and refusals at start, and the stand-ins that let SGLang run on a
CPU-only machine.

May import: sglang.operations, sglang.restart, sglang.protection, drills, settings, logs, metrics,
control, store, codec, threads, shm.
"""
