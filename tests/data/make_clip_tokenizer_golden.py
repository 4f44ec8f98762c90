"""Regenerate tests/data/clip_tokenizer_golden.json: the ids transformers'
CLIPTokenizer gives for the captions in tests/test_tokenizer.py, loaded from
the vocab.json/merges.txt that library.clip_tokenizer writes from the carried
BPE file (tokenizer 1: pad eos; tokenizer 2: pad "!").

    python tests/data/make_clip_tokenizer_golden.py

Needs transformers importable (it is a test-only reference)."""
import importlib.util
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from library.clip_tokenizer import EOS_TOKEN, SDXL_TOKENIZER2_PAD_TOKEN, write_hf_tokenizer_files  # noqa: E402


def main():
    from transformers import CLIPTokenizer

    spec = importlib.util.spec_from_file_location("_tok_test", os.path.join(ROOT, "tests", "test_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    out = {"captions": module.CAPTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pad in (("tokenizer1", EOS_TOKEN), ("tokenizer2", SDXL_TOKENIZER2_PAD_TOKEN)):
            d = os.path.join(tmp, name)
            write_hf_tokenizer_files(d, pad_token=pad)
            tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), pad_token=pad)
            out[name] = {
                "full": [tok(c).input_ids for c in module.CAPTIONS],
                "max77": [tok(c, padding="max_length", max_length=77, truncation=True).input_ids for c in module.CAPTIONS],
            }
    path = os.path.join(HERE, "clip_tokenizer_golden.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(path)


if __name__ == "__main__":
    main()
