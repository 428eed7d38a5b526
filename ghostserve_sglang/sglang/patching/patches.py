"""The patch layer: one table of SGLang targets drives both install and uninstall.

Supported SGLang releases and the exact signatures of the patched methods in each are data
(``releases.json`` beside this module, shipped in the package; see ``patches/README.md``); anything else
is refused before a method is touched, unless the operator overrides it. Install is idempotent and
all-or-nothing: a failure half-way restores what was wrapped.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import json
import pathlib
from collections.abc import Callable

import structlog
import wrapt

from ..restart import journal
from . import cpu_compat, hooks, main_hooks, restart_hooks

log = structlog.get_logger("ghostserve.patches")

SPEC_PATH = pathlib.Path(__file__).resolve().with_name("releases.json")


class PatchError(RuntimeError):
    """The installed SGLang is not one GhostServe can patch; one line says what differs."""


@dataclasses.dataclass(frozen=True)
class Target:
    module: str
    qualname: str  # "Class.method", or "function" for a module-level function
    wrapper: Callable

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}"

    def owner(self) -> tuple[object, str]:
        """What holds the target (its class, or its module) and the target's name there."""
        module = importlib.import_module(self.module)
        if "." not in self.qualname:
            return module, self.qualname
        cls_name, attr = self.qualname.split(".")
        return getattr(module, cls_name), attr


TARGETS = (
    Target("sglang.srt.managers.scheduler", "Scheduler.__init__", hooks.scheduler_init),
    Target("sglang.srt.managers.scheduler", "Scheduler.process_input_requests",
           hooks.process_input_requests),
    Target("sglang.srt.managers.scheduler_components.request_receiver",
           "SchedulerRequestReceiver._pull_raw_reqs", hooks.pull_raw_reqs),
    Target("sglang.srt.model_executor.model_runner", "ModelRunner.forward", hooks.model_forward),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.free", hooks.token_free),
    Target("sglang.srt.mem_cache.allocator.token", "TokenToKVPoolAllocator.clear", hooks.allocator_clear),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator._release_page_ids",
           hooks.release_page_ids),
    Target("sglang.srt.mem_cache.allocator.paged", "PagedTokenToKVPoolAllocator.clear",
           hooks.allocator_clear),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool.load_cpu_copy", hooks.pool_load_cpu_copy),
    Target("sglang.srt.mem_cache.memory_pool", "MHATokenToKVPool.move_kv_cache", hooks.pool_move_kv_cache),
    # Replacing a dead rank (docs/rank-restart.md): where survivors notice the death and hold.
    Target("sglang.srt.managers.scheduler_components.request_receiver",
           "SchedulerRequestReceiver._broadcast_reqs_across_ranks", restart_hooks.broadcast_reqs),
    Target("sglang.srt.managers.scheduler", "Scheduler.run_batch", restart_hooks.run_batch),
    Target("sglang.srt.managers.scheduler", "Scheduler.process_batch_result",
           restart_hooks.process_batch_result),
    Target("sglang.srt.managers.scheduler_components.output_streamer",
           "SchedulerOutputStreamer.stream_output", hooks.stream_output),
)

# On a CPU-only machine, whether or not protection is on (``--ghost-code off`` too): see cpu_compat.
CPU_TARGETS = (
    Target("sglang.srt.distributed.parallel_state", "GroupCoordinator.all_reduce",
           cpu_compat.ordered_all_reduce),
    Target("sglang.srt.layers.quantization.unquant", "UnquantizedLinearMethod.apply",
           cpu_compat.batch_invariant_linear),
    Target("sglang.srt.layers.quantization.unquant", "UnquantizedEmbeddingMethod.apply",
           cpu_compat.batch_invariant_linear),
)

# In SGLang's main process, when the launcher protects the server: supervision of the scheduler processes
# (docs/rank-restart.md).
MAIN_TARGETS = (
    Target("sglang.srt.entrypoints.engine", "Engine._launch_scheduler_processes",
           main_hooks.launch_scheduler_processes),
    Target("sglang.srt.entrypoints.engine", "_wait_for_scheduler_ready", main_hooks.wait_for_scheduler_ready),
    Target("sglang.srt.managers.tokenizer_manager", "SignalHandler.__init__", main_hooks.signal_handler_init),
    Target("sglang.srt.managers.tokenizer_manager", "SignalHandler.running_phase_sigquit_handler",
           main_hooks.running_phase_sigquit),
    Target("sglang.srt.utils.watchdog", "SubprocessWatchdog._check_processes",
           main_hooks.watchdog_check_processes),
    Target("sglang.srt.managers.tokenizer_manager", "TokenizerManager._dispatch_to_scheduler",
           journal.dispatch_to_scheduler),
    Target("sglang.srt.managers.tokenizer_manager", "TokenizerManager._async_dispatch_to_scheduler",
           journal.async_dispatch_to_scheduler),
)


ALL_TARGETS = (*TARGETS, *CPU_TARGETS, *MAIN_TARGETS)


def load_spec(path: pathlib.Path = SPEC_PATH) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise PatchError(f"cannot read the supported-version declarations {path}: {exc.strerror}") from None


def sglang_version() -> str:
    return importlib.metadata.version("sglang")


def differences(spec: dict | None = None, version: str | None = None) -> list[str]:
    """One line per way the installed SGLang differs from the declarations: an undeclared release, or a
    target whose signature is not the declared one; empty when GhostServe supports it."""
    spec = load_spec() if spec is None else spec
    version = sglang_version() if version is None else version
    releases = spec["releases"]
    if version not in releases:
        return [f"sglang {version} is not supported; supported: {', '.join(releases)}"]
    declared = releases[version]["signatures"]
    lines = []
    for target in ALL_TARGETS:
        found = signature_of(target)
        if declared.get(target.key) != found:
            lines.append(f"sglang {version}: {target.key}{found} differs from the declared "
                         f"{declared.get(target.key)}")
    return lines


def check_supported(spec: dict | None = None, version: str | None = None) -> None:
    """Raise PatchError unless this SGLang release is declared and every target has its declared
    signature."""
    lines = differences(spec, version)
    if lines:
        raise PatchError(f"{lines[0]} (--ghost-allow-unsupported-sglang=1 installs anyway)")


def declaration() -> dict:
    """The installed SGLang's entry for ``releases.json``: every target's signature."""
    return {sglang_version(): {"signatures": {t.key: signature_of(t) for t in ALL_TARGETS}}}


def signature_of(target: Target) -> str:
    cls, attr = target.owner()
    function = inspect.unwrap(cls.__dict__[attr]) if attr in cls.__dict__ else getattr(cls, attr)
    if isinstance(function, wrapt.FunctionWrapper):
        function = function.__wrapped__
    if isinstance(function, classmethod | staticmethod):
        function = function.__func__
    return str(inspect.signature(function))


class Patcher:
    """Owns GhostServe's wraps of SGLang. ``install`` twice warns and does nothing; ``uninstall``
    puts back exactly the attributes that were there."""

    def __init__(self, targets: tuple[Target, ...] = TARGETS) -> None:
        self.targets = targets
        self._saved: list[tuple[type, str, object]] = []

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def install(self, allow_unsupported: bool = False) -> None:
        if self.installed:
            log.warning("patches already installed")
            return
        if not allow_unsupported:
            check_supported()
        saved = []
        try:
            for target in self.targets:
                cls, attr = target.owner()
                saved.append((cls, attr, cls.__dict__[attr]))
                wrapt.wrap_function_wrapper(cls, attr, target.wrapper)
        except Exception:
            for cls, attr, original in reversed(saved):
                setattr(cls, attr, original)
            raise
        self._saved = saved
        log.info("patches installed", targets=len(saved), sglang=sglang_version())

    def uninstall(self) -> None:
        if not self.installed:
            log.warning("patches not installed")
            return
        for cls, attr, original in reversed(self._saved):
            setattr(cls, attr, original)
        self._saved = []
        log.info("patches uninstalled")


PATCHER = Patcher()
CPU_PATCHER = Patcher(CPU_TARGETS)
MAIN_PATCHER = Patcher(MAIN_TARGETS)
