#!/usr/bin/env python3
"""Counts the production lines of crates/*/src at a git revision (default HEAD): lines that are
neither blank nor `//` comments, leaving out #[cfg(test)] items and the crates that only test or
measure (testkit, bench, chaos, flushdelay). The measure of issue 18's proportion item.
Usage: scripts/production-lines.py [REV [BASE]]: with BASE, per-file changes from BASE to REV."""
import re
import subprocess
import sys

NOT_PRODUCTION = {"testkit", "bench", "chaos", "flushdelay"}
SRC = re.compile(r"crates/([^/]+)/src/.*\.rs$")


def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def code_lines(text):
    """`text` split into lines with its comments, strings and character literals emptied (their
    newlines kept, so the lines stay aligned): braces inside them are not the code's."""
    out, i, n = [], 0, len(text)
    ident = lambda k: k >= 0 and (text[k].isalnum() or text[k] == "_")
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c in "bcr\"" and not ident(i - 1) and re.match(r'(?:[bc]?r#*|[bc]?)"', text[i:i + 260]):
            m = re.match(r'([bc]?)(r?)(#*)"', text[i:])
            i += m.end()
            close = '"' + m.group(3)
            while i < n and not text.startswith(close, i):
                if not m.group(2) and text[i] == "\\":
                    out.append("\n" if text[i + 1:i + 2] == "\n" else "")
                    i += 2
                    continue
                out.append("\n" if text[i] == "\n" else "")
                i += 1
            i += len(close)
            out.append('""')
        elif c == "'" or (c == "b" and text.startswith("b'", i) and not ident(i - 1)):
            m = re.match(r"b?'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]*\}|.)|[^\\'\n])'", text[i:])
            if m:
                out.append("''")
                i += m.end()
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out).split("\n")


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
