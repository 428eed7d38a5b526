"""Which SGLang server options and models GhostServe protects, and the one-line refusal for the rest.

GhostServe protects the KV cache of one tensor-parallel group held in SGLang's MHA pool
(``MHATokenToKVPool``), written only through the calls the patch table wraps. A server option that adds
KV GhostServe does not see (a draft model's, a host tier's, another data-parallel group's) or a model
whose KV has another shape is refused before anything starts, with one line naming the option, as is a
parity code the tensor-parallel size cannot carry (``Settings.check_topology``). The same
rules run in two places: in the launcher before SGLang starts, and in every scheduler process before its
scheduler is built (a server started by ``python -m sglang.launch_server`` with ``GHOSTSERVE_*`` set).
The KV pool itself is checked again once it exists (``kv.check_pool``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ...settings import SettingsError

_FIX = "run without it, or with --ghost-code off"
_EXTERNAL_KV = ("it loads KV into the pool from another cache with its own kernels, past GhostServe's "
                "capture")
_DP_ATTENTION = ("DP attention splits the KV cache between data-parallel attention groups, and GhostServe "
                 "protects one tensor-parallel group")
_LORA = ("a replacement rank would not have the adapters loaded while the server runs, and LoRA serving has "
         "not been checked under GhostServe")


@dataclasses.dataclass(frozen=True)
class RefusedOption:
    flag: str
    given: Callable[[object], object]  # the option's value when it is set, else a false value
    reason: str


def _value(name: str, unset: object = None) -> Callable[[object], object]:
    def given(server_args) -> object:
        value = getattr(server_args, name, unset)
        return None if value in (unset, None, False) else value
    return given


REFUSED_OPTIONS = (
    RefusedOption("--speculative-algorithm", _value("speculative_algorithm"),
                  "speculative decoding keeps the draft model's KV in a pool of its own, which GhostServe "
                  "does not protect"),
    RefusedOption("--enable-hierarchical-cache", _value("enable_hierarchical_cache"),
                  "HiCache copies KV between host memory and the pool with its own kernels, past "
                  "GhostServe's capture"),
    RefusedOption("--enable-lmcache", _value("enable_lmcache"), _EXTERNAL_KV),
    RefusedOption("--enable-flexkv", _value("enable_flexkv"), _EXTERNAL_KV),
    RefusedOption("--enable-unified-cache-external-linker", _value("enable_unified_cache_external_linker"),
                  _EXTERNAL_KV),
    RefusedOption("--radix-cache-backend", _value("radix_cache_backend"),
                  "a registered radix-cache backend may load or move KV in the pool past GhostServe's "
                  "capture"),
    RefusedOption("--enable-hisparse", _value("enable_hisparse"),
                  "hierarchical sparse attention moves KV between host memory and the pool with its own "
                  "kernels, past GhostServe's capture"),
    RefusedOption("--attn-dp-size", _value("attn_dp_size", 1), _DP_ATTENTION),
    RefusedOption("--enable-dp-attention", _value("enable_dp_attention"), _DP_ATTENTION),
    RefusedOption("--dp-size", _value("dp_size", 1),
                  "GhostServe protects one tensor-parallel group, and data parallelism runs several"),
    RefusedOption("--pp-size", _value("pp_size", 1),
                  "each pipeline stage holds other layers' KV, and GhostServe protects one tensor-parallel "
                  "group"),
    RefusedOption("--dcp-size", _value("dcp_size", 1),
                  "decode context parallelism splits each request's KV by position between ranks"),
    RefusedOption("--attn-cp-size", _value("attn_cp_size", 1),
                  "context parallelism splits each request's KV by position between ranks"),
    RefusedOption("--lora-paths", _value("lora_paths"), _LORA),
    RefusedOption("--enable-lora", _value("enable_lora"), _LORA),
    RefusedOption("--disaggregation-mode", _value("disaggregation_mode", "null"),
                  "prefill-decode disaggregation moves KV between servers past GhostServe's capture"),
)


def option_refusal(server_args, code: str) -> str | None:
    """One line naming the first server option GhostServe refuses with ``--ghost-code=code``."""
    for option in REFUSED_OPTIONS:
        value = option.given(server_args)
        if value:
            shown = option.flag if value is True else f"{option.flag}={_text(value)}"
            return f"{shown} is not supported with --ghost-code={code}: {option.reason}; {_FIX}"
    return None


def _text(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def model_refusal(server_args, code: str) -> str | None:
    """One line naming the model when SGLang would keep its KV in a pool other than the MHA pool."""
    from sglang.srt.configs.hybrid_arch import mambaish_config
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig

    try:
        config = ModelConfig.from_server_args(server_args)
        kinds = [kind for kind, applies in (
            ("multi-head latent attention (MLA), whose KV is one compressed latent row per token",
             config.attention_arch == AttentionArch.MLA),
            ("hybrid sliding-window attention, whose KV is two pools of different sizes",
             config.is_hybrid_swa),
            ("hybrid linear attention, whose per-request state is not KV rows",
             config.attention_arch == AttentionArch.SSM or mambaish_config(config) is not None),
        ) if applies]
    except Exception:  # SGLang reports a model it cannot read, in its own words, when it starts; a pool
        return None    # other than the MHA pool is still refused once it exists (kv.check_pool)
    if not kinds:
        return None
    architecture = ",".join(config.hf_config.architectures or ["?"])
    return (f"--model-path={server_args.model_path} ({architecture}) uses {kinds[0]}, which is not "
            f"supported with --ghost-code={code}: GhostServe protects MHA and GQA attention in SGLang's "
            "MHATokenToKVPool; run it with --ghost-code off")


def refusal(server_args, settings) -> str | None:
    """What GhostServe refuses in this server with these ``Settings``, in one line; None when it can
    protect it."""
    try:
        settings.check_topology(server_args.tp_size)
    except SettingsError as exc:
        return str(exc)
    return option_refusal(server_args, settings.code) or model_refusal(server_args, settings.code)
