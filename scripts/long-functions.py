#!/usr/bin/env python3
"""Lists production functions longer than LIMIT lines (default 100) in crates/*/src, longest
first, leaving out #[cfg(test)] modules. Counts braces line by line: a rough but steady measure
for keeping functions in proportion (issue 18). Usage: scripts/long-functions.py [LIMIT]"""
import os
import re
import sys

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 100
FN = re.compile(r"\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")
TEST_MOD = re.compile(r"\s*(pub(\(crate\))? )?mod \w+")


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
