"""A Rust file's lines with comments, strings and character literals blanked, for the scripts
that count its braces (production-lines.py, long-functions.py)."""
import re

# A string literal's opening: b"…", c"…", r#"…"#, br"…", "…".
STRING = re.compile(r'([bc]?)(?:(r)(#*))?"')
# A character or byte literal: 'a', '\n', '\x7f', '\u{2028}', b'}' (not a lifetime: 'a, 'static).
CHAR = re.compile(r"b?'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]*\}|.)|[^\\'\n])'")


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
        elif c in "bcr\"" and not ident(i - 1) and (m := STRING.match(text, i)):
            raw, close, i = m.group(2), '"' + (m.group(3) or ""), m.end()
            while i < n and not text.startswith(close, i):
                if not raw and text[i] == "\\":
                    out.append("\n" if text[i + 1:i + 2] == "\n" else "")
                    i += 2
                    continue
                out.append("\n" if text[i] == "\n" else "")
                i += 1
            i += len(close)
            out.append('""')
        elif c in "b'" and not (c == "b" and ident(i - 1)) and (m := CHAR.match(text, i)):
            out.append("''")
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out).split("\n")
