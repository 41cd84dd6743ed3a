"""A tiny, valid, deterministic llama-architecture GGUF model for tests and demos.

The model has random weights (it generates gibberish) but is a complete GGUF that llama.cpp loads and
serves: llama hyper-parameters, a small SentencePiece-style ("llama") vocabulary with byte fallback, and a
jinja chat template so ``python -m llama_cpp.server`` answers ``/v1/chat/completions``.

Every 2-D weight has a row width (``ne0``) that is a multiple of 256 with the default sizes, so K-quants
(Q4_K_M, Q5_K_M, Q6_K, ...) apply to every tensor without shape fallbacks.

Same arguments -> byte-identical file (``GGUFWriter`` writes nothing time- or host-dependent).

No Dagster imports here; numpy and gguf are imported inside functions.

CLI: ``python -m idp_pipelines.embedded.tiny_model OUT.gguf [--seed N] [--dtype f16]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = [
    "TINY_MODEL_NAME",
    "TINY_VOCAB_SIZE",
    "TINY_CHAT_TEMPLATE",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "tiny_vocab",
    "write_tiny_gguf",
    "main",
]

TINY_MODEL_NAME = "tiny-llama"
TINY_VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# A simple chat template (rendered by llama-cpp-python's Jinja2ChatFormatter; BOS is added by the tokenizer).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SPACE = "\u2581"  # SentencePiece word-boundary marker "▁"

# Common words (ordered roughly by frequency). Every prefix of "▁word" becomes a piece so that the SPM
# tokenizer, which only merges adjacent symbols whose concatenation is in the vocabulary, can reach them.
_WORDS = (
    "Hello hello Hi world The This I model token llama test "
    "the of and to in is it you that he was for on are as with his they at be this have from or one had "
    "by but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who its now find long down day "
    "did get come made may part"
).split()

_SINGLE_CHARS = (
    [_SPACE]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + [str(d) for d in range(10)]
    + list(".,!?'\"-:;()<>|/")
)

_SUFFIXES = ("ing", "ed", "er", "ly", "es", "s", "th", "he", "in", "an", "re", "on", "at", "en", "nd", "ti")


def tiny_vocab(n_vocab: int = TINY_VOCAB_SIZE) -> tuple[list[str], list[float], list[int]]:
    """Return (tokens, scores, token_types) of the tiny SentencePiece-style vocabulary.

    Layout: 0 ``<unk>`` (UNKNOWN), 1 ``<s>`` and 2 ``</s>`` (CONTROL), 3..258 the byte-fallback tokens
    ``<0x00>``..``<0xFF>`` (BYTE), then NORMAL word pieces with "▁" word-boundary prefixes and decreasing
    scores (log-probability-like), padded to exactly ``n_vocab``.
    """
    from gguf import TokenType

    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [int(TokenType.UNKNOWN), int(TokenType.CONTROL), int(TokenType.CONTROL)]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(int(TokenType.BYTE))
    n_special = len(tokens)
    if n_vocab < n_special + len(_SINGLE_CHARS):
        raise ValueError(f"n_vocab must be >= {n_special + len(_SINGLE_CHARS)}, got {n_vocab}")

    pieces: list[str] = []
    seen: set[str] = set(tokens)

    def add(piece: str) -> None:
        if piece not in seen and len(pieces) + n_special < n_vocab:
            seen.add(piece)
            pieces.append(piece)

    for ch in _SINGLE_CHARS:
        add(ch)
    for word in _WORDS:
        full = _SPACE + word
        for end in range(2, len(full) + 1):
            add(full[:end])
    for suffix in _SUFFIXES:
        for end in range(2, len(suffix) + 1):
            add(suffix[:end])
    # Pad deterministically with two-letter pieces if the word list did not fill the vocabulary.
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    for a in letters:
        for b in letters:
            add(a + b)
    if len(pieces) + n_special != n_vocab:  # pragma: no cover - only for absurdly large n_vocab
        raise ValueError(f"cannot build a vocabulary of {n_vocab} tokens")

    tokens.extend(pieces)
    types.extend([int(TokenType.NORMAL)] * len(pieces))
    scores = [0.0] * n_special + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def _tensor_specs(n_vocab: int, n_embd: int, n_layer: int, n_head: int, n_head_kv: int, n_ff: int):
    """(name, numpy shape) in the llama layout. numpy shape (rows, cols) -> GGUF ne = (cols, rows)."""
    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    specs: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (n_vocab, n_embd))]
    for i in range(n_layer):
        p = f"blk.{i}."
        specs += [
            (p + "attn_norm.weight", (n_embd,)),
            (p + "attn_q.weight", (n_embd, n_embd)),
            (p + "attn_k.weight", (n_embd_kv, n_embd)),
            (p + "attn_v.weight", (n_embd_kv, n_embd)),
            (p + "attn_output.weight", (n_embd, n_embd)),
            (p + "ffn_norm.weight", (n_embd,)),
            (p + "ffn_gate.weight", (n_ff, n_embd)),
            (p + "ffn_up.weight", (n_ff, n_embd)),
            (p + "ffn_down.weight", (n_embd, n_ff)),
        ]
    specs += [("output_norm.weight", (n_embd,)), ("output.weight", (n_vocab, n_embd))]
    return specs


def write_tiny_gguf(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_embd: int = 256,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 512,
    n_ctx: int = 512,
    dtype: str = "f32",
) -> Path:
    """Write a tiny llama-architecture GGUF with random weights to ``path`` and return the path.

    Weights: ``numpy.random.default_rng(seed)`` normal, std 0.02; norm weights are 1.0 (always F32).
    ``dtype`` ("f32" or "f16") is the type of the 2-D weights (the usual source formats for quantization).
    With the defaults every 2-D weight row width (ne0) is 256 or 512, so K-quants apply without fallback.
    The file is written to a temporary file in the same directory and moved into place with os.replace,
    so ``path`` never holds a partial file. Same arguments -> byte-identical output.
    """
    import numpy as np
    from gguf import GGUFWriter, LlamaFileType

    dtype = dtype.lower()
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    for name, value in (("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head),
                        ("n_head_kv", n_head_kv), ("n_ff", n_ff), ("n_ctx", n_ctx)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if n_embd % n_head:
        raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
    if n_head % n_head_kv:
        raise ValueError(f"n_head ({n_head}) must be divisible by n_head_kv ({n_head_kv})")
    if (n_embd // n_head) % 2:
        raise ValueError(f"head dim n_embd/n_head ({n_embd // n_head}) must be even (RoPE)")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np_wdtype = np.float32 if dtype == "f32" else np.float16
    file_type = LlamaFileType.ALL_F32 if dtype == "f32" else LlamaFileType.MOSTLY_F16

    tokens, scores, token_types = tiny_vocab(TINY_VOCAB_SIZE)
    n_vocab = len(tokens)
    head_dim = n_embd // n_head

    rng = np.random.default_rng(seed)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, arch="llama")
        try:
            writer.add_name(TINY_MODEL_NAME)
            writer.add_type("model")
            writer.add_description("Tiny random-weight llama model for tests (generates gibberish)")
            writer.add_file_type(int(file_type))
            writer.add_vocab_size(n_vocab)
            writer.add_context_length(n_ctx)
            writer.add_embedding_length(n_embd)
            writer.add_block_count(n_layer)
            writer.add_feed_forward_length(n_ff)
            writer.add_head_count(n_head)
            writer.add_head_count_kv(n_head_kv)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(10000.0)
            writer.add_layer_norm_rms_eps(1e-5)

            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens)
            writer.add_token_scores(scores)
            writer.add_token_types(token_types)
            writer.add_bos_token_id(BOS_ID)
            writer.add_eos_token_id(EOS_ID)
            writer.add_unk_token_id(UNK_ID)
            writer.add_add_bos_token(True)
            writer.add_add_eos_token(False)
            writer.add_add_space_prefix(True)
            writer.add_chat_template(TINY_CHAT_TEMPLATE)

            for name, shape in _tensor_specs(n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff):
                if len(shape) == 1:
                    data = np.ones(shape, dtype=np.float32)  # norms: 1.0, kept F32 like real converters
                else:
                    data = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(np_wdtype)
                writer.add_tensor(name, data)

            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is meant to be read by servers
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m idp_pipelines.embedded.tiny_model",
        description="Write a tiny random-weight llama GGUF model (deterministic for a given seed).",
    )
    parser.add_argument("out", type=Path, help="output .gguf path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-head-kv", type=int, default=2)
    parser.add_argument("--n-ff", type=int, default=512)
    parser.add_argument("--n-ctx", type=int, default=512)
    args = parser.parse_args(argv)
    try:
        out = write_tiny_gguf(
            args.out, seed=args.seed, dtype=args.dtype, n_embd=args.n_embd, n_layer=args.n_layer,
            n_head=args.n_head, n_head_kv=args.n_head_kv, n_ff=args.n_ff, n_ctx=args.n_ctx,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{out} {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
