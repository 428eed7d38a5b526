"""Deterministic generation of a bundled model's weights and tokenizer from its ``config.json``.

Weights are uniform random numbers at an ordinary initialisation scale, drawn from numpy's PCG64 seeded
by the model's and the tensor's names, and stored in float32: the stream is bit arithmetic only, so the
bytes are the same on every machine, and ``SHA256SUMS`` (committed) proves it at each build. At this
scale attention mixes the whole context into every position, so a model's greedy continuation depends
on the KV cache, not only on the last token.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on a text generated from a
fixed word list, with exactly ``vocab_size`` entries: ``<unk>``, ``<s>`` and ``</s>`` are ids 0, 1, 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
GENERATED = ("model.safetensors", "tokenizer.json", "tokenizer_config.json")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_WORDS = (
    "the a an one two three every each some many few all no of in on at by for with from into over under "
    "after before between through during without within along across behind beyond near far up down out "
    "off again then once here there when where why how what which who whom whose this that these those "
    "and but or nor so yet because although while if unless until since as than like just only also "
    "very too quite rather almost always never often sometimes soon late early now today tomorrow "
    "server request token cache memory device rank parity shard slot layer head model prompt answer "
    "query key value batch step prefill decode stream kernel thread process signal fault failure "
    "recovery rebuild replica copy host page pool block table index record checksum watermark drain "
    "ring buffer queue event lock clock second minute hour day week month year time speed latency "
    "throughput bandwidth capacity size length width height weight number count total half part whole "
    "river mountain forest valley ocean island desert city village garden field road bridge tower "
    "house room door window wall floor roof kitchen table chair lamp book letter paper pen story song "
    "music picture colour light dark red green blue yellow white black silver golden bright quiet loud "
    "warm cold soft hard fast slow small large long short old new young early happy calm brave clever "
    "run walk read write speak listen watch wait carry bring build break fix open close start stop turn "
    "move keep hold give take make find lose learn teach think know remember forget begin finish grow "
    "rain snow wind storm cloud sun moon star sky sea stone sand fire water air earth tree leaf flower "
    "bird fish horse dog cat fox wolf bear deer owl bee ant people friend teacher student doctor farmer "
    "sailor baker driver painter writer engineer operator user team group family child mother father "
    "is are was were be been being has have had do does did will would can could shall should may might "
    "must need want like love hate help try use see hear feel say tell ask call work play live"
).split()


def corpus(seed: int = 7, sentences: int = 4000) -> list[str]:
    """Sentences of words from a fixed list, with numbers and punctuation, the same on every machine."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randrange(4, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randrange(0, 2000)))
        text = " ".join(words)
        lines.append(text[0].upper() + text[1:] + rng.choice(".?!,;:"))
    return lines


def tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} entries; the model has {vocab_size}")
    return tokenizer.to_str(pretty=True)


def tokenizer_config() -> str:
    return json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
        "eos_token": "</s>", "add_bos_token": False, "model_max_length": 8192,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n"


def _uniform(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform in [-a, a] with standard deviation ``std``; seeded by ``name`` only."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.Generator(np.random.PCG64(seed))
    unit = rng.random(shape, dtype=np.float32)  # (next 32 bits >> 8) * 2**-24: exact everywhere
    a = np.float32(std * 3 ** 0.5)
    return (unit * np.float32(2) - np.float32(1)) * a


def weights(model: str, config: dict) -> dict[str, np.ndarray]:
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = (config["num_attention_heads"], config["num_key_value_heads"],
                                 config["head_dim"])
    vocab = config["vocab_size"]

    def linear(name: str, out_features: int, in_features: int, gain: float = 1.0) -> None:
        tensors[name] = _uniform(f"{model}/{name}", (out_features, in_features), gain / in_features ** 0.5)

    tensors = {"model.embed_tokens.weight": _uniform(f"{model}/embed", (vocab, hidden), 1.0),
               "model.norm.weight": np.ones(hidden, dtype=np.float32)}
    linear("lm_head.weight", vocab, hidden, 2.0)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # Larger q/k gains than the others make attention pick out tokens rather than average them.
        linear(p + "self_attn.q_proj.weight", heads * head_dim, hidden, 2.0)
        linear(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden, 2.0)
        linear(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden)
        linear(p + "self_attn.o_proj.weight", hidden, heads * head_dim)
        linear(p + "mlp.gate_proj.weight", inner, hidden)
        linear(p + "mlp.up_proj.weight", inner, hidden)
        linear(p + "mlp.down_proj.weight", hidden, inner)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float32)
    return tensors


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def expected_sums(directory: Path) -> dict[str, str]:
    sums = {}
    for line in (directory / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


def is_built(directory: Path) -> bool:
    return all((directory / name).exists() for name in GENERATED)


def build(source: Path, target: Path, check: bool = True) -> None:
    """Write the generated files for the model described in ``source`` into ``target`` (the same folder,
    or another one that then also gets ``config.json``). With ``check``, refuse bytes that differ from
    the committed ``SHA256SUMS``."""
    from safetensors.numpy import save_file

    config = json.loads((source / "config.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        staged = Path(tmp)
        save_file(weights(source.name, config), str(staged / "model.safetensors"))
        (staged / "tokenizer.json").write_text(tokenizer_json(config["vocab_size"]))
        (staged / "tokenizer_config.json").write_text(tokenizer_config())
        if check:
            want = expected_sums(source)
            for name in GENERATED:
                if _sha256(staged / name) != want[name]:
                    raise RuntimeError(f"generated {name} for {source.name} differs from "
                                       f"{source}/SHA256SUMS; the numpy or tokenizers release changed "
                                       "its output")
        if target != source:
            for name in ("config.json", "SHA256SUMS"):
                (staged / name).write_bytes((source / name).read_bytes())
        for path in staged.iterdir():
            path.chmod(0o644)
            os.replace(path, target / path.name)  # atomic: a concurrent reader sees old or new, whole


def write_sums(directory: Path) -> None:
    """Record the generated files' digests (when the generator itself is changed on purpose)."""
    lines = [f"{_sha256(directory / name)}  {name}" for name in GENERATED]
    (directory / "SHA256SUMS").write_text("\n".join(lines) + "\n")
