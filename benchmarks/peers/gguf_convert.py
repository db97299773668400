"""Converts a model directory to GGUF with llama.cpp's own `convert_hf_to_gguf.py` (run from its checkout).

Our tokenizer is byte-level BPE with GPT-2's pre-tokenizer regex but trained here, so the converter's
fingerprint check (a hash of the tokenizer's output on a fixed text) does not know it and stops with "BPE
pre-tokenizer was not recognized". `--pre gpt-2` declares the pre-tokenizer instead; bench_peer.py then checks
that llama.cpp tokenizes and decodes greedily exactly like transformers before any number is taken.

    python -m benchmarks.peers.gguf_convert LLAMA_CPP_DIR MODEL_DIR OUT.gguf [--pre gpt-2]
"""

from __future__ import annotations

import argparse
import runpy
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("llama_cpp_dir")
    parser.add_argument("model_dir")
    parser.add_argument("outfile")
    parser.add_argument("--pre", help="declare the BPE pre-tokenizer instead of fingerprinting it")
    args = parser.parse_args()
    sys.path.insert(0, args.llama_cpp_dir)
    if args.pre:
        from conversion import base  # llama.cpp's converter package

        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: args.pre
    sys.argv = [
        "convert_hf_to_gguf.py",
        args.model_dir,
        "--outfile",
        args.outfile,
        "--outtype",
        "f32",
    ]
    runpy.run_path(f"{args.llama_cpp_dir}/convert_hf_to_gguf.py", run_name="__main__")


if __name__ == "__main__":
    main()
