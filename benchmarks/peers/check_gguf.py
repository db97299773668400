"""Checks a GGUF conversion against transformers before any llama.cpp number is taken: same token ids for
the same text, and the same greedy continuation (32 tokens) for the same chat prompt.

    python -m benchmarks.peers.check_gguf MODEL_DIR MODEL.gguf      (needs llama-cpp-python and torch)
"""

from __future__ import annotations

import sys

TEXTS = ["Hello café 東京 the session token", "What is the cache?", "😀 def class return {} [] 42"]


def main() -> None:
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    llm = Llama(model_path=gguf, n_ctx=2048, verbose=False, n_threads=1)
    same_ids = same_greedy = 0
    for text in TEXTS:
        same_ids += tokenizer.encode(text, add_special_tokens=False) == llm.tokenize(
            text.encode(), add_bos=False, special=False
        )
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        want = model.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None
        )
        got = []
        for token_id in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token_id)
            if len(got) == 32:
                break
        same_greedy += got == want[0, len(ids) :].tolist()
    print(
        f"same token ids {same_ids}/{len(TEXTS)}; same greedy 32 tokens {same_greedy}/{len(TEXTS)}"
    )


if __name__ == "__main__":
    main()
