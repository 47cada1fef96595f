"""Convert OpenAI's CLIP BPE vocabulary into a `CLIPTokenizer` folder (vocab.json + merges.txt).

Run once; the output is committed under `ablation/tokenizer/`. The source file
`bpe_simple_vocab_16e6.txt.gz` ships inside the `open_clip_torch` and `clip-anytorch` wheels:

    pip download --no-deps open_clip_torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/convert_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The vocabulary construction follows CLIP's `simple_tokenizer.py` (byte symbols, byte symbols with
the end-of-word marker, one symbol per merge, then the two special tokens), which gives the 49,408
ids that Stable Diffusion's tokenizer uses. Written by hand because no library converts this file.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable unicode map of GPT-2/CLIP BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def convert(bpe_gz: Path, out_dir: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs to `out_dir`."""
    with gzip.open(bpe_gz) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : NUM_MERGES + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": True, **special}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "ablation" / "tokenizer")
    args = parser.parse_args()
    convert(args.bpe_gz, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
