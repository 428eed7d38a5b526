"""Replacing a dead scheduler rank (docs/rank-restart.md): the supervisor in SGLang's main process,
the membership files through which it announces a replacement, the survivors' hold and rejoin, the
re-formed groups, the scheduler state sent to the replacement, and the requests handed over when rank 0
is replaced.

May import: sglang.protection, drills, settings, logs, metrics, control, store, codec, threads, shm.
"""
