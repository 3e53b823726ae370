"""Strips the machine's absolute paths from the logs a run leaves, before they are committed.

    python3 -m benchmarks.sanitize [--root DIR] [--out DIR] FILE...

pip's build log names the checkout ("Obtaining file:///work/main") and its temporary wheel
cache, pytest's warnings the interpreter's site-packages, run.py the output folder: none of it
says anything about the code, and it is someone's machine. Each such prefix becomes a
placeholder: <repo>, <out>, <site-packages>, <prefix> (the interpreter's), <tmp>, ~ (home).
benchmarks/device_check.sh runs this on its three logs.
"""

from __future__ import annotations

import argparse
import re
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def placeholders(root: Path = REPO_ROOT, out: Path | None = None) -> list[tuple[str, str]]:
    """(absolute path, placeholder) pairs of this machine, each path also as resolved (symlinks)."""
    named = [(root, "<repo>")] + ([(out, "<out>")] if out is not None else [])
    paths = sysconfig.get_paths()
    named += [(Path(p), "<site-packages>") for p in
              {*site.getsitepackages(), site.getusersitepackages(), paths["purelib"], paths["platlib"]}]
    named += [(Path(p), "<prefix>") for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    named += [(Path(tempfile.gettempdir()), "<tmp>"), (Path.home(), "~")]
    pairs = {}
    for path, name in named:
        for p in (path.absolute(), path.resolve()):
            if len(p.parts) >= 2:  # never "/" itself
                pairs.setdefault(str(p), name)
    return list(pairs.items())


def sanitize(text: str, pairs: list[tuple[str, str]]) -> str:
    """Replaces each path where it stands as a whole path or a path's prefix (/work/main in
    /work/main/x and file:///work/main, not in /work/mainline or /x/work/main); the longest
    first, so that a venv's site-packages inside the checkout reads <site-packages>."""
    if not pairs:
        return text
    by_path = dict(pairs)
    alternatives = "|".join(re.escape(p) for p in sorted(by_path, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w.-])({alternatives})(?![\w-]|\.\w)")
    return pattern.sub(lambda m: by_path[m.group(1)], text)


def sanitize_file(path: Path, pairs: list[tuple[str, str]]) -> bool:
    """Rewrites the file in place; True if anything changed. A missing file is skipped (a stage
    that did not run left none)."""
    if not path.is_file():
        return False
    text = path.read_text(errors="replace")
    clean = sanitize(text, pairs)
    if clean != text:
        path.write_text(clean)
    return clean != text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--root", type=Path, default=REPO_ROOT, help="the checkout (default: this file's)")
    p.add_argument("--out", type=Path, help="the output folder, named <out>")
    args = p.parse_args(argv)
    pairs = placeholders(args.root, args.out)
    for path in args.files:
        sanitize_file(path, pairs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
