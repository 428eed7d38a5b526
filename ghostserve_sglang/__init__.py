"""GhostServe for SGLang: erasure-code parity of the KV cache, kept in host memory, and the replacement
of a dead tensor-parallel rank, as an add-on to an unmodified SGLang server.

The package is built in floors; data flows down, and a module imports only from its own floor and the
floors below (each folder's docstring says what it may import, in a ``May import:`` line that
``tests/test_layout.py`` checks):

    launch, cli           entry points: the launcher and the ``ghostserve`` command
    testing               harness for the tests, benchmarks and device checks (never imported by them)
    sglang.patching       what is installed into SGLang: the patch table, its wrappers, the plugin
    sglang.operations     what a control request (status, scrub, recover, a drill) does on each rank
    sglang.restart        replacing a dead rank: supervision, membership, state transfer, regrouping
    sglang.protection     protecting the KV: capture, exchange, encode, rebuild
    drills                faults caused on purpose, for testing
    settings, logs, metrics, control, models
    store                 the host parity store and its drain
    codec, threads, shm   the erasure codes; GhostServe's background threads, named for the OS; the
                          node's shared-memory directory

May import: anything.
"""
