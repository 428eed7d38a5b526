"""GhostServe's settings: one declarative table drives the ``--ghost-*`` flags, the ``GHOSTSERVE_*``
environment variables that carry them into SGLang's spawned processes, and their validation.

Every flag maps 1:1 to a variable (``--ghost-parity-shards`` <-> ``GHOSTSERVE_PARITY_SHARDS``). The
launcher parses flags, validates them against the SGLang arguments and exports the variables; every
scheduler process reads the same variables back with ``Settings.from_env``.

May import: store, codec.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping

from .store import EXISTING, ON_FULL

CODES = ("xor", "rs", "replicate", "file", "off")
LOG_FORMATS = ("console", "json")
ENV_PREFIX = "GHOSTSERVE_"


class SettingsError(ValueError):
    """A GhostServe setting or combination of settings is not allowed; one line says which."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise ValueError("allowed: 1, 0, true, false")


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], object]
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    unit: str = ""

    @property
    def flag(self) -> str:
        return "--ghost-" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS = (
    Option("code", str, "xor", "erasure code of the KV parity; replicate keeps a full copy in host "
           "memory, file a full copy on local disk (baselines); off runs SGLang unprotected", CODES),
    Option("parity_shards", int, 1, "parity shards m (xor: 1; rs: 1 <= m < tp size; replicate: ignored)"),
    Option("staging_mib", int, 64, "host staging ring per rank between capture and the parity table",
           unit="MiB"),
    Option("capture_queue_mib", int, 0, "device memory for captured KV rows waiting to be encoded; "
           "a full queue makes the step wait (counted as backpressure), and a write larger than a quarter "
           "of it is captured in parts; 0: 1/64 of this rank's KV pool, at least 16 MiB", unit="MiB"),
    Option("on_full", str, "block", "when staging is full past the stall timeout: block the step, or "
           "drop protection of that step's slots (counted)", ON_FULL),
    Option("stall_timeout_seconds", float, 0.05, "how long a full staging ring may stall a step before "
           "--ghost-on-full applies", unit="s"),
    Option("file_dir", str, "/var/tmp/ghostserve", "where --ghost-code=file keeps its copies (a local "
           "disk); each batch is written through with msync before it counts as durable"),
    Option("instance_id", str, "", "names this server's host parity segments and control socket; "
           "default: the server port"),
    Option("shm_dir", str, "/dev/shm", "this node's shared-memory directory (a tmpfs): the host parity "
           "segments, progress stamps, exchange mailboxes and control socket live there"),
    Option("coordinator_port", int, 0, "port of the membership store that node 0's launcher serves; "
           "every node's launcher and rank reaches it to replace a dead rank; 0: the --dist-init-addr port "
           "+ 1 with --nnodes > 1, a free local port otherwise"),
    Option("existing_store", str, "remove", "what to do with parity segments a dead server left "
           "behind (a live owner's are never touched)", EXISTING),
    Option("strict", _bool, False, "an error inside GhostServe stops the server (for tests) instead of "
           "being counted and logged once"),
    Option("allow_unsupported_sglang", _bool, False, "install the patches on an SGLang release that "
           "GhostServe does not declare, or whose patched methods differ (`ghostserve check-sglang` "
           "shows how)"),
    Option("enable_fault_injection", _bool, False, "allow `ghostserve inject-fault` (destroys ranks' KV "
           "to exercise recovery) and `ghostserve drain`; never on in production"),
    Option("auto_recover", _bool, True, "rebuild lost KV right after an injected fault (otherwise wait "
           "for `ghostserve recover`)"),
    Option("recompute_below_tokens", int, 0, "recompute instead of rebuilding when fewer live tokens than "
           "this would be rebuilt (re-prefill is cheaper for short contexts)", unit="tokens"),
    Option("rejoin_timeout_seconds", float, 600.0, "how long a dead TP rank's replacement may take to "
           "start, load the weights and join the survivors before the server fails stop", unit="s"),
    Option("hang_timeout_seconds", float, 10.0, "how long a TP rank may stay in one phase while another "
           "waits for it in a collective before it counts as hung and is ended and replaced; 0: never",
           unit="s"),
    Option("standby", int, 1, "scheduler processes kept started, with torch and SGLang imported, to "
           "replace a dead or hung TP rank in seconds (TP >= 2); more deaths at once than standbys start "
           "the rest cold; 0: none"),
    Option("max_restarts", int, 3, "how many times one TP rank may be replaced within "
           "--ghost-restart-period-seconds; its next death in that period stops the server (a crash "
           "loop); 0: no limit"),
    Option("restart_period_seconds", float, 600.0, "the period --ghost-max-restarts counts "
           "replacements in", unit="s"),
    Option("log_format", str, "console", "GhostServe's log lines: console for people, json for machines",
           LOG_FORMATS),
)
_KINDS = {int: "an integer", float: "a number", str: "text"}
_BY_NAME = {option.name: option for option in OPTIONS}
# The numeric settings' lower bounds: (name, (">" or ">=", bound), what the bound means).
_LOWER_BOUNDS = (
    ("parity_shards", (">=", 1), ""),
    ("staging_mib", (">=", 1), ""),
    ("capture_queue_mib", (">=", 0), " (0: sized from the KV pool)"),
    ("recompute_below_tokens", (">=", 0), ""),
    ("rejoin_timeout_seconds", (">", 0), ""),
    ("hang_timeout_seconds", (">=", 0), " (0: hangs are not looked for)"),
    ("standby", (">=", 0), " (0: none)"),
    ("max_restarts", (">=", 0), " (0: no limit)"),
    ("restart_period_seconds", (">", 0), ""),
    ("stall_timeout_seconds", (">=", 0), ""),
    ("coordinator_port", (">=", 0), " (0: chosen as its help says)"),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated settings; build with ``from_values``/``from_env`` (defaults come from ``OPTIONS``)."""

    code: str
    parity_shards: int
    staging_mib: int
    capture_queue_mib: int
    on_full: str
    stall_timeout_seconds: float
    file_dir: str
    instance_id: str
    shm_dir: str
    coordinator_port: int
    existing_store: str
    strict: bool
    allow_unsupported_sglang: bool
    enable_fault_injection: bool
    auto_recover: bool
    recompute_below_tokens: int
    rejoin_timeout_seconds: float
    hang_timeout_seconds: float
    standby: int
    max_restarts: int
    restart_period_seconds: float
    log_format: str

    def __post_init__(self) -> None:
        for option in OPTIONS:
            value = getattr(self, option.name)
            if option.choices and value not in option.choices:
                raise SettingsError(f"{option.flag}={value} is not allowed; allowed: "
                                    f"{', '.join(option.choices)}")
        for name, bound, note in _LOWER_BOUNDS:
            value, (op, limit) = getattr(self, name), bound
            if not (value > limit if op == ">" else value >= limit):
                raise SettingsError(f"{_BY_NAME[name].flag}={value} is not allowed; it must be {op} {limit}"
                                    f"{note}")
        if self.coordinator_port > 65535:
            raise SettingsError(f"--ghost-coordinator-port={self.coordinator_port} is not allowed; it must "
                                "be a TCP port, at most 65535 (0: chosen as its help says)")
        if not os.path.isabs(self.shm_dir):
            raise SettingsError(f"--ghost-shm-dir={self.shm_dir} is not allowed; it must be an absolute "
                                "path")

    @property
    def enabled(self) -> bool:
        return self.code != "off"

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> Settings:
        """Parse text values keyed by option name; a bad one raises one line naming it."""
        parsed = {o.name: o.default for o in OPTIONS}
        for name, text in values.items():
            option = _BY_NAME[name]
            try:
                parsed[name] = option.parse(text)
            except ValueError as exc:
                allowed = str(exc) if option.parse is _bool else f"it must be {_KINDS[option.parse]}"
                raise SettingsError(
                    f"{option.flag}={text} ({option.env}) is not allowed; {allowed}") from None
        return cls(**parsed)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        return cls.from_values({o.name: environ[o.env] for o in OPTIONS if o.env in environ})

    def to_env(self) -> dict[str, str]:
        def text(value: object) -> str:
            return ("1" if value else "0") if isinstance(value, bool) else str(value)

        return {o.env: text(getattr(self, o.name)) for o in OPTIONS}

    def check_topology(self, tp_size: int) -> None:
        """Refuse a code that the tensor-parallel size cannot carry (other SGLang options:
        ``sglang.compatibility``)."""
        if not self.enabled:
            return
        m = self.parity_shards
        if self.code == "xor" and m != 1:
            raise SettingsError(f"--ghost-parity-shards={m} is not allowed with --ghost-code=xor; xor "
                                "has exactly 1 parity shard (use rs for more)")
        if self.code in ("xor", "rs") and m >= tp_size:
            raise SettingsError(f"--ghost-parity-shards={m} is not allowed with --tp-size={tp_size}; "
                                f"{self.code} needs fewer parity shards than ranks (use "
                                "--ghost-code=replicate at this tp size)")
        if self.code == "rs" and tp_size + m > 256:
            raise SettingsError(f"--tp-size={tp_size} plus --ghost-parity-shards={m} is {tp_size + m}; "
                                "rs over GF(2^8) allows at most 256 shards")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--ghost-*`` group; values stay text and are parsed by ``Settings.from_values``."""
    group = parser.add_argument_group("GhostServe", "KV-cache parity protection (each flag is also "
                                      "read from the GHOSTSERVE_* variable named in its help)")
    for option in OPTIONS:
        unit = f" [{option.unit}]" if option.unit else ""
        choices = f" {{{','.join(option.choices)}}}" if option.choices else ""
        group.add_argument(option.flag, dest="ghost_" + option.name, default=None, metavar="VALUE",
                           help=f"{option.help}{unit};{choices} default {option.default!r}; {option.env}")


def from_arguments(namespace: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags win over the environment, which wins over defaults."""
    environ = os.environ if environ is None else environ
    values = {o.name: environ[o.env] for o in OPTIONS if o.env in environ}
    for option in OPTIONS:
        given = getattr(namespace, "ghost_" + option.name, None)
        if given is not None:
            values[option.name] = given
    return Settings.from_values(values)
