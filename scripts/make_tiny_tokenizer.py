"""Write the CLIP BPE vocabulary that ships with the embedded tiny stack.

A real `CLIPTokenizer` reads these files. Every byte is a token, so any caption tokenizes; the words of the
shapes world and common caption words are merged into single tokens so short captions stay short.

Usage: python scripts/make_tiny_tokenizer.py [out_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WORDS = """
a an the of on in at with and or to for by from is are this that photo picture image painting drawing
render rendering style art close up portrait background foreground small large big tiny huge left right
top bottom center middle red green blue yellow purple orange white black gray grey pink brown cyan magenta
circle square triangle star hexagon cross shape shapes dog cat person man woman child car house tree sky
water mountain city street flower bird horse face sks zwx ohwx high quality detailed simple plain dark
light bright two three one many
"""

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sdtune" / "models" / "assets" / "tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """The byte → printable-character table of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def apply_bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Tokenize one word with the merges so far (lowest rank first), as CLIP's BPE does."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def build(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges: all bytes (plain and word-final), then merges that make each word one token.

    Each new merge joins the first two pieces of the word as the merges so far split it; appended with the
    lowest priority, it cannot change how earlier words (already single tokens) are split.
    """
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := apply_bpe(word, ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            tokens.append(parts[0] + parts[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def main(out: Path) -> None:
    words = sorted(set(WORDS.split()), key=lambda w: (len(w), w))
    vocab, merges = build(words)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
