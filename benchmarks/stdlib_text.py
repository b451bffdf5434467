"""Held-out text of another kind than the built-in conversations: docstrings of Python standard-library modules,
one paragraph per docstring, written as a .txt that `flexi eval --data` reads. flexicli never trains on it (its
`docs` data reads third-party packages only), so it measures quality and budget on text no run has seen.

    python benchmarks/stdlib_text.py -o stdlib.txt && flexi eval --data stdlib.txt --json
"""

from __future__ import annotations

import argparse
import ast
import sysconfig
from pathlib import Path

MODULES = ("json/__init__", "argparse", "collections/__init__", "functools", "pathlib", "subprocess", "textwrap", "datetime",
           "logging/__init__", "csv", "heapq", "shutil", "tarfile", "unittest/case", "email/message", "http/client")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-o", "--output", default="stdlib.txt")
    ap.add_argument("--min-chars", type=int, default=300)
    args = ap.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in MODULES:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= args.min_chars:
                    docs.append(" ".join(doc.split()))  # one paragraph: .txt data splits on blank lines
    Path(args.output).write_text("\n\n".join(docs) + "\n")
    print(f"{len(docs)} docstrings, {sum(map(len, docs))} characters -> {args.output}")


if __name__ == "__main__":
    main()
