"""Trains a small sentencepiece BPE tokenizer on a text file (one sentence per line).

    python tools/train_tokenizer.py --input corpus.txt --vocab-size 512 --out-prefix DIR/tokenizer

writes DIR/tokenizer.model (and .vocab). A thin CLI over `jreason.tokenizer.train_sentencepiece`,
which holds the settings and explains them; this file only parses arguments. For real models,
reuse the pretrained model's tokenizer instead: ids must match the checkpoint's embeddings.
"""

import argparse

from jreason.tokenizer import load_tokenizer, train_sentencepiece


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="text file, one sentence per line")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--out-prefix", required=True, help="writes OUT_PREFIX.model")
    args = parser.parse_args(argv)
    path = train_sentencepiece(args.input, args.vocab_size, args.out_prefix)
    tok = load_tokenizer(path)
    print(f"wrote {path} (vocab {tok.vocab_size})")


if __name__ == "__main__":
    main()
