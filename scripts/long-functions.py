#!/usr/bin/env python3
"""Lists production functions longer than LIMIT lines (default 100) in crates/*/src, longest
first, leaving out #[cfg(test)] modules. Counts braces line by line: a rough but steady measure
for keeping functions in proportion (issue 18). Usage: scripts/long-functions.py [LIMIT]"""
import os
import re
import sys

from rust_code import code_lines

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 100
FN = re.compile(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
TEST_MOD = re.compile(r"\s*(pub(\(crate\))? )?mod \w+")


def block_end(lines, i):
    """The line after the block that opens at or after line i, or None for a bodiless fn
    (`lines` as [`code_lines`] gives them)."""
    depth, opened = 0, False
    for j in range(i, len(lines)):
        c = lines[j]
        if not opened and j > i and c.strip().endswith(";") and "{" not in c:
            return None
        depth += c.count("{") - c.count("}")
        opened = opened or "{" in c
        if opened and depth <= 0:
            return j + 1
    return None


found = []
for d, _, files in os.walk("crates"):
    if "/src" not in d + "/":
        continue
    for f in files:
        if not f.endswith(".rs"):
            continue
        path = os.path.join(d, f)
        lines = code_lines(open(path, encoding="utf-8").read())
        tests = set()
        for i, line in enumerate(lines):
            if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and TEST_MOD.match(lines[i + 1]):
                tests.update(range(i, block_end(lines, i + 1) or len(lines)))
        for i, line in enumerate(lines):
            m = FN.match(line)
            if i in tests or not m:
                continue
            end = block_end(lines, i)
            if end and end - i > LIMIT:
                found.append((end - i, path, i + 1, m.group(6)))
for n, path, line, name in sorted(found, reverse=True):
    print(f"{n:5} {path}:{line} {name}")
