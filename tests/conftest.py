import contextlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before any
# kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # SGLang and its kernel libraries warn on import about missing GPUs and their own deprecations.
    for line in ("ignore::DeprecationWarning", "ignore::UserWarning:sglang.*",
                 "ignore::UserWarning:flashinfer.*"):
        config.addinivalue_line("filterwarnings", line)
    config.addinivalue_line("markers", "shared_server(kind): the module's tests share that kind's server")
    config.addinivalue_line("markers", "shared_server_last: ends or replaces the shared server; runs last")


# -- servers shared between test modules -------------------------------------------------------------
# A module marked ``pytestmark = pytest.mark.shared_server(kind)`` gets the one server of that kind
# through the ``shared_server`` fixture. Modules of a kind run one after the other, and at most one
# shared server lives at a time: it is stopped as soon as the next test needs another (or none), since
# an idle SGLang server with TP > 1 keeps its schedulers busy and would slow whatever runs beside it.
FAULTS = ["--ghost-enable-fault-injection", "1", "--ghost-strict", "1",
          "--ghost-rejoin-timeout-seconds", "240", "--ghost-hang-timeout-seconds", "5",
          "--ghost-max-restarts", "0"]  # these servers replace ranks many times, on purpose
CHUNKS = ["--chunked-prefill-size", "128"]
SHARED_SERVERS = {
    # --watchdog-timeout 5: the launcher raises it above a hang's detection and replacement
    "xor2": dict(tp_size=2, ghost_args=["--ghost-code", "xor", *FAULTS],
                 extra=[*CHUNKS, "--watchdog-timeout", "5"]),
    "rs3": dict(tp_size=3, ghost_args=["--ghost-code", "rs", "--ghost-parity-shards", "2", *FAULTS],
                extra=CHUNKS, model="tiny-llama-gqa"),
    "off2": dict(tp_size=2, ghost_args=["--ghost-code", "off"], extra=CHUNKS),
    # bfloat16 (test_bf16_tokens), without a small prefill chunk: where a prompt is cut changes its tokens
    "bf16": dict(tp_size=2, ghost_args=["--ghost-code", "xor", *FAULTS], extra=["--dtype", "bfloat16"]),
    # metrics and JSON logs (test_observability), then a crash loop that ends it (test_rank_crash_loop)
    "metrics2": dict(tp_size=2, ghost_args=["--ghost-code", "xor", "--ghost-enable-fault-injection", "1",
                                            "--ghost-strict", "1", "--ghost-log-format", "json",
                                            "--ghost-rejoin-timeout-seconds", "240",
                                            "--ghost-max-restarts", "2"],
                     extra=["--enable-metrics", *CHUNKS]),
}


class SharedServers:
    def __init__(self) -> None:
        self.kind: str | None = None
        self.server = None
        self._stack: contextlib.ExitStack | None = None
        self.log_dir: str | None = None

    def get(self, kind: str):
        """The server of ``kind``, started now if it is not the one running (or it has ended)."""
        if kind == self.kind and self.server.process.poll() is None:
            return self.server
        self.stop()
        from ghostserve_sglang.testing.local_server import launched

        self._stack = contextlib.ExitStack()
        self.server = self._stack.enter_context(launched(**SHARED_SERVERS[kind], log_dir=self.log_dir))
        self.kind = kind
        return self.server

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self.server, self.kind = None, None, None


SHARED = SharedServers()


def _kind(item) -> str | None:
    marker = item.get_closest_marker("shared_server")
    return marker.args[0] if marker else None


def pytest_collection_modifyitems(session, config, items):
    """Modules that share a server kind run one after the other, where the first of them was, and a test
    marked ``shared_server_last`` (it ends or replaces the shared server) after all the others of its
    kind; otherwise the order stays."""
    first: dict[str, int] = {}
    module_first: dict[str, int] = {}
    for index, item in enumerate(items):
        module_first.setdefault(item.module.__name__, index)
        if (kind := _kind(item)) is not None:
            first.setdefault(kind, index)

    def key(item):
        kind, module = _kind(item), module_first[item.module.__name__]
        last = item.get_closest_marker("shared_server_last") is not None
        return (first[kind] if kind else module, last, module)

    items.sort(key=key)  # stable: the order inside a module is kept


def pytest_runtest_teardown(item, nextitem):
    if SHARED.kind is not None and (nextitem is None or _kind(nextitem) != SHARED.kind):
        SHARED.stop()


@pytest.fixture(scope="session")
def shared_servers(tmp_path_factory) -> SharedServers:
    """For a test that needs another kind too (mark it ``shared_server_last``)."""
    if SHARED.log_dir is None:
        SHARED.log_dir = str(tmp_path_factory.mktemp("shared-servers"))
    return SHARED


@pytest.fixture
def shared_server(request, shared_servers):
    kind = _kind(request.node)
    assert kind is not None, "shared_server needs the module marked pytest.mark.shared_server(kind)"
    return shared_servers.get(kind)


def pytest_sessionfinish(session, exitstatus):
    SHARED.stop()
