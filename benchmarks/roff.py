"""A small roff (``man`` macros) to plain-text converter for man-page corpora.

Enough of roff for the Linux man-pages project's pages: sections (``.SH``),
font macros (``.B``, ``.BR``, ``.IR`` ...), paragraph macros, tables kept as
text, comments and the common escapes. Not a typesetter: the goal is the
words of each section, in order, for a retrieval corpus.
"""

from __future__ import annotations

import shlex

# Font-alternating macros: arguments are joined without spaces.
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_FONT = {"B", "I", "SM", "SB"}
# Macros whose line carries no text (layout only).
_LAYOUT = {"PP", "LP", "P", "HP", "RS", "RE", "sp", "br", "nf", "fi", "EX", "EE",
           "in", "ti", "ad", "na", "ne", "hy", "nh", "ft", "ps", "vs", "ll", "TS",
           "TE", "T&", "UE", "ME", "YS", "SY", "PD", "TH", "ds", "de", "ig", "if",
           "ie", "el", "so", "tr", "nr", "cs", "lf", "ta", "mso", "OP"}
_NAMED = {"em": "-", "en": "-", "hy": "-", "mi": "-", "aq": "'", "dq": '"',
          "lq": '"', "rq": '"', "oq": "'", "cq": "'", "bu": "*", "co": "(c)",
          "rg": "(R)", "tm": "(TM)", "<=": "<=", ">=": ">=", "!=": "!=",
          "->": "->", "<-": "<-", "mu": "x", "di": "/", "ti": "~", "ha": "^",
          "ga": "`", "aa": "'", "rs": "\\", "sl": "/", "ba": "|", "pl": "+",
          "eq": "=", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "Fo": "<<",
          "Fc": ">>", "de": "degrees", "+-": "+-", "fm": "'", "sq": "*"}
_STRINGS = {"lq": '"', "rq": '"', "R": "(R)", "Tm": "(TM)", "S": "", "T": ""}


def unescape(text: str) -> str:
    """Removes roff escapes from one line of text.

    >>> unescape(r"\\fBprintf\\fP() \\- print \\(lqhello\\(rq")
    'printf() - print "hello"'
    """
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != "\\" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        i += 2
        if nxt == '"':  # comment to end of line
            break
        if nxt in "fF":  # font change: \fB, \f(CW, \f[CR]
            i = _skip_name(text, i)
        elif nxt == "s":  # size change: \s-1, \s+2, \s0, \s(12, \s[12]
            if i < n and text[i] in "+-":
                i += 1
            if i < n and text[i] in "([":
                i = _skip_name(text, i)
            else:
                while i < n and text[i].isdigit():
                    i += 1
        elif nxt == "(":
            out.append(_NAMED.get(text[i:i + 2], ""))
            i += 2
        elif nxt == "[":
            end = text.find("]", i)
            end = n if end < 0 else end
            name = text[i:end]
            out.append(_NAMED.get(name, "") if not name.startswith("u")
                       else _codepoint(name[1:]))
            i = end + 1
        elif nxt == "*":  # string: \*(lq, \*[name], \*R
            if i < n and text[i] == "(":
                out.append(_STRINGS.get(text[i + 1:i + 3], ""))
                i += 3
            elif i < n and text[i] == "[":
                end = text.find("]", i)
                end = n if end < 0 else end
                out.append(_STRINGS.get(text[i + 1:end], ""))
                i = end + 1
            else:
                out.append(_STRINGS.get(text[i:i + 1], ""))
                i += 1
        elif nxt in "-e\\":
            out.append("-" if nxt == "-" else "\\")
        elif nxt in "~ 0":
            out.append(" ")
        elif nxt in "&|^%:cdu/,)!{}zRkp":
            pass  # zero-width or layout escapes
        elif nxt in "nmgVY":  # registers, colours: \n(xx, \m[red]
            i = _skip_name(text, i)
        elif nxt in "hvwlLxbHoSDNXAB":  # escapes with a delimited argument
            if i < n:
                delim = text[i]
                end = text.find(delim, i + 1)
                i = n if end < 0 else end + 1
        elif nxt in ".'`":
            out.append(nxt if nxt != "`" else "`")
        else:
            out.append(nxt)
    return "".join(out)


def _skip_name(text: str, i: int) -> int:
    """Skips a roff name after an escape: ``X``, ``(XX`` or ``[name]``."""
    if i >= len(text):
        return i
    if text[i] == "(":
        return i + 3
    if text[i] == "[":
        end = text.find("]", i)
        return len(text) if end < 0 else end + 1
    return i + 1


def _codepoint(hexdigits: str) -> str:
    try:
        return chr(int(hexdigits.split("_")[0], 16))
    except ValueError:
        return ""


def _args(rest: str) -> list[str]:
    try:
        return shlex.split(rest.replace("\\", "\\\\"), posix=True)
    except ValueError:
        return rest.split()


def sections(source: str) -> dict[str, str]:
    """Splits a ``man``-macro page into plain-text sections.

    Args:
        source: The page's roff source.

    Returns:
        Section title (upper case, e.g. ``NAME``, ``DESCRIPTION``) -> its text,
        paragraphs separated by blank lines and whitespace collapsed inside them.

    >>> page = ('.TH X 3\\n.SH NAME\\nx \\\\- do it\\n.SH DESCRIPTION\\n'
    ...         '.BR x ()\\ndoes\\n.I it .\\n.PP\\nAgain.\\n')
    >>> sections(page)
    {'NAME': 'x - do it', 'DESCRIPTION': 'x() does it .\\n\\nAgain.'}
    """
    result: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    skipping_block = False
    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line in (".", "'"):
            continue
        if skipping_block:  # .ig ... ..  / .de ... ..
            if line.startswith(".."):
                skipping_block = False
            continue
        if line[:1] in ".'" and len(line) > 1:
            macro, _, rest = line[1:].lstrip().partition(" ")
            macro = macro.strip()
            if macro in ("ig", "de", "de1", "am"):
                skipping_block = True
                continue
            if macro in ("SH", "SS"):
                title = " ".join(unescape(a) for a in _args(rest)).strip()
                if macro == "SH":
                    current = result.setdefault(title.upper(), [[]])
                elif current is not None:
                    current.append([title])
                    current.append([])
                continue
            if current is None:
                continue
            if macro in _ALTERNATING:
                text = "".join(unescape(a) for a in _args(rest))
            elif macro in _FONT:
                text = " ".join(unescape(a) for a in _args(rest))
            elif macro in ("TP", "IP", "PP", "LP", "P", "HP", "TQ"):
                current.append([])
                args = _args(rest)
                text = unescape(args[0]) if macro == "IP" and args else ""
            elif macro in ("UR", "MT"):
                text = unescape(rest)
            elif macro in _LAYOUT or not macro.isidentifier():
                continue
            else:
                continue  # unknown request: drop the line
        else:
            if current is None:
                continue
            text = unescape(line.replace("\t", " "))
        if text.strip():
            current[-1].append(text.strip())
    return {
        title: "\n\n".join(" ".join(" ".join(p).split()) for p in paras
                           if " ".join(p).strip())
        for title, paras in result.items()
    }
