#!/usr/bin/env python3
"""Counts the production lines of crates/*/src at a git revision (default HEAD): lines that are
neither blank nor `//` comments, leaving out #[cfg(test)] items and the crates that only test or
measure (testkit, bench, chaos, flushdelay). The measure of issue 18's proportion item.
Usage: scripts/production-lines.py [REV [BASE]]: with BASE, per-file changes from BASE to REV."""
import re
import subprocess
import sys

from rust_code import code_lines

NOT_PRODUCTION = {"testkit", "bench", "chaos", "flushdelay"}
SRC = re.compile(r"crates/([^/]+)/src/.*\.rs$")


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def count(text):
    lines, code, n, i = text.split("\n"), code_lines(text), 0, 0
    while i < len(lines):
        if re.match(r"\s*#\[cfg\(test\)\]", lines[i]):
            # Skip the item that follows: a block, or a single line ending in `;`.
            j, depth, opened = i + 1, 0, False
            while j < len(lines):
                c = code[j]
                depth += c.count("{") - c.count("}")
                opened = opened or "{" in c
                if (opened and depth <= 0) or (not opened and lines[j].rstrip().endswith(";")):
                    break
                j += 1
            i = j + 1
            continue
        s = lines[i].strip()
        n += bool(s) and not s.startswith("//")
        i += 1
    return n


def per_file(rev):
    out = {}
    for f in git("ls-tree", "-r", "--name-only", rev, "crates/").split():
        m = SRC.match(f)
        if m and m.group(1) not in NOT_PRODUCTION and "/tests/" not in f:
            out[f] = count(git("show", f"{rev}:{f}"))
    return out


rev = sys.argv[1] if len(sys.argv) > 1 else "HEAD"
now = per_file(rev)
if len(sys.argv) > 2:
    base = per_file(sys.argv[2])
    for f in sorted(set(now) | set(base), key=lambda f: now.get(f, 0) - base.get(f, 0)):
        if now.get(f, 0) != base.get(f, 0):
            print(f"{now.get(f, 0) - base.get(f, 0):+6} {now.get(f, 0):6} {f}")
    print(f"{sys.argv[2]}: {sum(base.values())}")
print(f"{rev}: {sum(now.values())}")
