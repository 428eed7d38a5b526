"""Replacing a dead scheduler rank (docs/rank-restart.md): the supervisor in SGLang's main process of
each node, the membership store through which node 0's announces a replacement to every node, the
survivors' hold and rejoin, the re-formed groups, the scheduler state sent to the replacement, and the
requests handed over when rank 0 is replaced.

May import: sglang.protection, drills, settings, logs, metrics, control, store, codec, threads, shm.
"""
