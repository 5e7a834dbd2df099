"""A small reader of PHIL files for machines without libtbx (the GPU machines; pure Python).

It reads the subset of PHIL that this project's flat parameter files use, with libtbx.phil's
meaning, so a script can take the same files on a machine with cctbx (through libtbx.phil) and on
one without (through this module); tests/util/test_phil_lite.py checks that both give the same
values for every file under phil/campaign/.

Supported:

- scopes ``name { ... }`` (nested; ``a.b { ... }`` too), definitions ``key = value`` and dotted
  ``a.b.key = value`` at any level, the value running to the end of its line (or to a closing
  ``}`` on that line);
- comments from ``#`` to the end of the line (outside quotes); single- or double-quoted words;
- in a master scope, the attributes ``.type``, ``.help`` (quoted, may span lines) and any other
  ``.attribute = ...`` (read and ignored); types ``int``, ``float``, ``bool``, ``str``, ``path``,
  ``ints``, ``floats``, ``strings`` and ``choice`` (the default marked ``*``), each accepting
  ``None``; ``int(value_min=1)``-style arguments are read and ignored;
- ``key=value`` overrides as on a DIALS command line, where ``key`` may be any unique trailing
  part of a definition's path (``n=300`` for ``ladder.n``).

``auto`` (any case, any type) is the string ``"auto"`` (libtbx.phil gives its ``libtbx.Auto``:
callers that compare map it to ``"auto"``).

Not supported (an error, never a silent difference): ``include``, ``$``-substitutions,
multiple-definition scopes (``.multiple = True``).

Values come back as a flat ``{path: value}`` dict (``"ladder.n": [300, 1000]``), as
``libtbx.phil`` gives them through ``all_definitions()`` / ``extract()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["PhilError", "Definition", "parse_master", "parse_values", "fetch", "apply_overrides", "as_namespace"]


class PhilError(ValueError):
    """A PHIL text or value this reader cannot accept (the message says where)."""


@dataclass
class Definition:
    """One master definition: its dotted ``path``, PHIL ``type`` (``int``, ``choice`` ...), the
    default as words (choice: every option, the default marked ``*``) and the ``help`` text."""

    path: str
    type: str = "str"
    words: list[str] = field(default_factory=list)
    help: str = ""


_TOKEN = re.compile(r"""[ \t\r\f\v]*(?:(\#[^\n]*)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(\{|\}|=|\n)|([^\s{}="'#]+))""")


def _tokens(text: str, origin: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) with kind in {"word", "quoted", "{", "}", "=", "newline"}; comments dropped."""
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise PhilError(f"{origin}, line {line}: cannot read {text[pos:pos + 20]!r}")
        comment, quoted, punct, word = m.groups()
        line_at = line + text.count("\n", pos, m.start(m.lastindex))
        if quoted is not None:
            out.append(("quoted", quoted[1:-1], line_at))
        elif punct is not None:
            out.append(("newline" if punct == "\n" else punct, punct, line_at))
        elif word is not None:
            out.append(("word", word, line_at))
        elif comment is None and m.group(0).strip():
            raise PhilError(f"{origin}, line {line}: cannot read {m.group(0)!r}")
        line += text.count("\n", pos, m.end())
        pos = m.end()
    return out


def _statements(text: str, origin: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    """(dotted path, value tokens [(kind, text)], line) of every ``key = value`` in ``text``,
    scopes flattened into the path; attributes (``.type = ...``) keep their leading dot."""
    tokens = _tokens(text, origin)
    scope: list[str] = []
    out = []
    i = 0
    while i < len(tokens):
        kind, word, line = tokens[i]
        if kind == "newline":
            i += 1
            continue
        if kind == "}":
            if not scope:
                raise PhilError(f"{origin}, line {line}: '}}' without a scope")
            scope.pop()
            i += 1
            continue
        if kind != "word":
            raise PhilError(f"{origin}, line {line}: expected a name, found {word!r}")
        if word in ("include",) or word.startswith("$"):
            raise PhilError(f"{origin}, line {line}: {word!r} is not supported by this reader (libtbx.phil only)")
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("newline", "\n", line)
        while nxt[0] == "newline" and i + 2 < len(tokens) and tokens[i + 2][0] == "{":
            i += 1
            nxt = tokens[i + 1]
        if nxt[0] == "{":
            scope.append(word)
            i += 2
            continue
        if nxt[0] != "=":
            raise PhilError(f"{origin}, line {line}: expected '=' or '{{' after {word!r}")
        i += 2
        values = []
        while i < len(tokens) and tokens[i][0] not in ("newline", "}"):
            if tokens[i][0] == "{" or (tokens[i][0] == "=" and not word.startswith(".")):  # .type = int(value_min=1)
                raise PhilError(f"{origin}, line {tokens[i][2]}: unexpected {tokens[i][1]!r} in the value of {word!r}")
            values.append((tokens[i][0], tokens[i][1]))
            i += 1
        path = ".".join([*scope, word]) if not word.startswith(".") else word
        out.append((path, values, line))
    if scope:
        raise PhilError(f"{origin}: scope {'.'.join(scope)!r} is not closed")
    return out


def parse_master(text: str, origin: str = "master") -> dict[str, Definition]:
    """The definitions of a master scope, by dotted path, in order."""
    defs: dict[str, Definition] = {}
    last: Definition | None = None
    for path, values, line in _statements(text, origin):
        if path.startswith("."):
            if last is None:
                raise PhilError(f"{origin}, line {line}: attribute {path} before any definition")
            if path == ".type":
                last.type = values[0][1].split("(")[0] if values else "str"
            elif path == ".help":
                last.help = " ".join(v for _, v in values)
            elif path == ".multiple" and values and values[0][1] == "True":
                raise PhilError(f"{origin}, line {line}: .multiple is not supported by this reader")
            continue
        last = Definition(path, "str", [v for _, v in values])
        defs[path] = last
    return defs


def _convert(definition: Definition, words: list[str], origin: str):
    """A definition's value from its words, as libtbx.phil's extract() gives it."""
    kind = definition.type
    if len(words) == 1 and words[0].lstrip("*").lower() == "auto":  # libtbx.Auto, whatever the type
        return "auto"
    if kind == "choice":
        options = [w.lstrip("*") for w in definition.words]
        marked = [w.lstrip("*") for w in words if w.startswith("*")]
        if words == definition.words:  # the master's own default
            return marked[0] if marked else None
        chosen = marked[0] if marked else (words[0] if len(words) == 1 else None)
        if chosen is None or chosen not in options and chosen != "None":
            raise PhilError(f"{origin}: {definition.path} must be one of {options}, not {' '.join(words)!r}")
        return None if chosen == "None" else chosen
    if words in ([], ["None"]):
        return None
    try:
        if kind == "int":
            (w,) = words
            return int(w)
        if kind == "float":
            (w,) = words
            return float(w)
        if kind == "bool":
            (w,) = words
            if w.lower() not in ("true", "false"):
                raise ValueError(w)
            return w.lower() == "true"
        if kind in ("ints", "floats"):
            parts = [p for w in words for p in w.split(",") if p]
            return [int(p) if kind == "ints" else float(p) for p in parts]
        if kind == "strings":
            return list(words)
        if kind in ("str", "path"):
            return " ".join(words)
    except ValueError:
        raise PhilError(f"{origin}: {definition.path} = {' '.join(words)!r} is not a valid {kind}") from None
    raise PhilError(f"{origin}: {definition.path} has type {kind!r}, which this reader does not know")


def parse_values(text: str, origin: str = "input") -> list[tuple[str, list[str], int]]:
    """(dotted path, value words, line) of every definition in a user's PHIL text."""
    out = []
    for path, values, line in _statements(text, origin):
        if path.startswith("."):
            raise PhilError(f"{origin}, line {line}: attribute {path} outside a master scope")
        out.append((path, [v for _, v in values], line))
    return out


def _resolve(master: dict[str, Definition], path: str, origin: str) -> str:
    """The master path that ``path`` names: itself, or the one path it is a unique trailing part of."""
    if path in master:
        return path
    matches = [p for p in master if p.endswith("." + path)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise PhilError(f"{origin}: unknown parameter {path!r}")
    raise PhilError(f"{origin}: {path!r} is ambiguous: {', '.join(matches)}")


def fetch(master: dict[str, Definition], sources: list[tuple[str, str]]) -> dict:
    """Flat ``{path: value}`` of the master with the user texts ``sources`` [(text, origin)]
    applied in order (later definitions win), every value converted to its type."""
    words = {p: d.words for p, d in master.items()}
    origins = {p: "master" for p in master}
    for text, origin in sources:
        for path, value, line in parse_values(text, origin):
            full = path if path in master else None
            if full is None:
                raise PhilError(f"{origin}, line {line}: unknown parameter {path!r}")
            words[full], origins[full] = value, f"{origin}, line {line}"
    return {p: _convert(master[p], words[p], origins[p]) for p in master}


def apply_overrides(master: dict[str, Definition], values: dict, arguments: list[str]) -> dict:
    """``values`` with command-line ``key=value`` arguments applied (``key``: a path or a unique
    trailing part of one; the value is split into words like a PHIL line)."""
    out = dict(values)
    for arg in arguments:
        if "=" not in arg:
            raise PhilError(f"command line: {arg!r} is not key=value")
        key, text = arg.split("=", 1)
        path = _resolve(master, key.strip(), f"command line {arg!r}")
        words = [v for k, v, _ in _tokens(text, f"command line {arg!r}") if k in ("word", "quoted")]
        out[path] = _convert(master[path], words, f"command line {arg!r}")
    return out


class _Namespace:
    """Attribute access to nested parameters (``params.ladder.n``)."""

    def __init__(self, items: dict):
        self.__dict__.update(items)

    def __repr__(self) -> str:
        return f"Namespace({self.__dict__})"


def as_namespace(values: dict) -> _Namespace:
    """Nested attribute access to a flat ``{path: value}`` dict."""
    tree: dict = {}
    for path, value in values.items():
        node = tree
        *scopes, name = path.split(".")
        for s in scopes:
            node = node.setdefault(s, {})
        node[name] = value

    def build(node: dict) -> _Namespace:
        return _Namespace({k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(tree)
