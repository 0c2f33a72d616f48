"""One-off generator of the ImageNet label lists in ``src/vitlab/hub/labels/`` (the outputs are committed data).

Writes, one class per line in class-index order, ``<synset>\\t<lemmas>`` (UTF-8, no header):

* ``imagenet1k.txt``: the 1000 ILSVRC-2012 classes in the standard order (timm's ``imagenet_synsets.txt``);
* ``imagenet21k.txt``: the 21843 classes in the order of Google's ImageNet-21k checkpoints (ViT, AugReg,
  BiT-M; timm's ``imagenet21k_goog_synsets.txt``).

The lemmas (WordNet 3.0 lemma names) come from timm's ``imagenet_synset_to_lemma.txt``; a synset without a
lemma would be written alone (with timm 1.0.31 none lacks one). The inputs are the data files installed
with timm (``timm/data/_info/``); nothing is downloaded. Run from the repository root, with timm installed::

    python tools/make_labels.py            # writes the two files
    python tools/make_labels.py --check    # exits 1 if the committed files differ from what it would write
"""
from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "vitlab" / "hub" / "labels"
LISTS = {"imagenet1k": "imagenet_synsets.txt", "imagenet21k": "imagenet21k_goog_synsets.txt"}


def _info(name: str) -> list[str]:
    text = resources.files("timm.data").joinpath("_info", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def build() -> tuple[dict[str, str], dict[str, int]]:
    """{file name: text} and {file name: number of synsets without a lemma}."""
    lemmas = dict(line.split("\t", 1) for line in _info("imagenet_synset_to_lemma.txt"))
    texts, missing = {}, {}
    for out, src in LISTS.items():
        synsets = _info(src)
        if len(set(synsets)) != len(synsets):
            raise SystemExit(f"{src} repeats a synset")
        lines = [f"{s}\t{lemmas[s].strip()}" if lemmas.get(s, "").strip() else s for s in synsets]
        texts[f"{out}.txt"] = "\n".join(lines) + "\n"
        missing[f"{out}.txt"] = sum(1 for s in synsets if not lemmas.get(s, "").strip())
    return texts, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    texts, missing = build()
    status = 0
    for name, text in texts.items():
        path = OUT / name
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{name}: {'up to date' if same else 'DIFFERS'}")
            status |= not same
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"{name}: {text.count(chr(10))} lines, {missing[name]} synsets without a lemma")
    return status


if __name__ == "__main__":
    sys.exit(main())
