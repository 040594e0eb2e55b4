"""A small interpreter for the part of Go's text/template that Ollama's chat templates use, with
the values Ollama hands a template that ranges over .Messages (template/template.go, Execute and
collate, read in ollama/ollama): `.System` is every system message's text joined by a blank line,
`.Messages` every message — the system ones too — with consecutive messages of one role merged
(their texts joined by a blank line), each a struct with `.Role` and `.Content`.

What it covers, with Go's meaning: text; `{{-` / `-}}` trimming; `{{ range PIPE }}` and
`{{ range $i, $m := PIPE }}`; `if` / `else if` / `else` / `end`; variables (`$x := ...`, `$x = ...`
assignment, `$` the root, scoped to the end of the control structure declaring them); fields of
the dot, of `$` and of variables; the functions eq, ne, lt, le, gt, ge, and, or, not, len, index,
slice; parenthesized pipelines; string, integer and boolean constants. A field the dot does not
have is an error, as in Go: `.System` inside a range over messages fails in Ollama, so it fails
here too.
"""
from __future__ import annotations

import re


class GoTemplateError(Exception):
    pass


class Message:
    """api.Message as a template sees it: a struct; a field it lacks is an execution error."""

    def __init__(self, role: str, content: str):
        self.Role, self.Content = role, content

    def field(self, name: str):
        if name not in ("Role", "Content"):
            raise GoTemplateError(f"can't evaluate field {name} in type *api.Message")
        return getattr(self, name)


def ollama_values(messages: list[dict]) -> dict:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    collated: list[Message] = []
    for m in messages:
        if collated and collated[-1].Role == m["role"] and m["role"] != "tool":
            collated[-1].Content += "\n\n" + m["content"]
        else:
            collated.append(Message(m["role"], m["content"]))
    return {"System": system, "Messages": collated, "Tools": None, "Response": ""}


def _truth(v) -> bool:
    return not (v is None or v is False or v == 0 and not isinstance(v, str) or
                (hasattr(v, "__len__") and len(v) == 0))


def _show(v) -> str:
    if v is True or v is False:
        return "true" if v else "false"
    return "<no value>" if v is None else str(v)


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_WORD = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')
_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "not": lambda a: not _truth(a), "len": lambda a: len(a), "index": lambda a, *i: _index(a, i),
    "slice": lambda a, *i: a[i[0]:i[1]] if len(i) == 2 else a[i[0]:] if i else a[:],
}


def _index(a, idx):
    for i in idx:
        a = a[i]
    return a


def _parse(template: str):
    """The template as a tree: ("text", s), ("act", expr), ("if", [(cond|None, body)]),
    ("range", decl_vars, expr, body)."""
    parts, pos = [], 0
    for m in _ACTION.finditer(template):
        parts.append(["text", template[pos:m.start()]])
        if m.group(1) and parts[-1][1]:
            parts[-1][1] = parts[-1][1].rstrip(" \t\r\n")
        parts.append(["act", m.group(2).strip(), bool(m.group(3))])
        pos = m.end()
    parts.append(["text", template[pos:]])
    for i, p in enumerate(parts):  # -}} trims the text after it
        if p[0] == "act" and p[2]:
            parts[i + 1][1] = parts[i + 1][1].lstrip(" \t\r\n")

    def block(i, stop=True):
        nodes = []
        while i < len(parts):
            kind, val = parts[i][0], parts[i][1]
            if kind == "text":
                if val:
                    nodes.append(("text", val))
                i += 1
            elif val == "end" or val.startswith("else"):
                if not stop:
                    raise GoTemplateError(f"unexpected {{{{ {val} }}}}")
                return nodes, i
            elif val.startswith("range "):
                rest = val[6:].strip()
                decl = []
                mm = re.match(r"(\$\w*)\s*(?:,\s*(\$\w*)\s*)?:=\s*(.*)", rest, re.S)
                if mm:
                    decl = [v for v in (mm.group(1), mm.group(2)) if v]
                    rest = mm.group(3)
                body, i = block(i + 1)
                if parts[i][1] != "end":
                    raise GoTemplateError("range ... else is not supported here")
                nodes.append(("range", decl, rest, body))
                i += 1
            elif val.startswith("if "):
                branches, cond = [], val[3:]
                while True:
                    body, i = block(i + 1)
                    branches.append((cond, body))
                    a = parts[i][1]
                    if a == "end":
                        break
                    cond = a[8:] if a.startswith("else if ") else None
                nodes.append(("if", branches))
                i += 1
            else:
                nodes.append(("act", val))
                i += 1
        if stop:
            raise GoTemplateError("missing {{ end }}")
        return nodes, i

    return block(0, stop=False)[0]


class _Exec:
    def __init__(self, root):
        self.root = root
        self.scopes = [{"$": root}]

    def lookup(self, name):
        for s in reversed(self.scopes):
            if name in s:
                return s[name]
        raise GoTemplateError(f'undefined variable "{name}"')

    def assign(self, name, value):
        for s in reversed(self.scopes):
            if name in s:
                s[name] = value
                return
        raise GoTemplateError(f'undefined variable "{name}"')

    @staticmethod
    def field(obj, name):
        if isinstance(obj, Message):
            return obj.field(name)
        if isinstance(obj, dict):
            return obj.get(name)  # Ollama's root is a map, parsed with missingkey=zero
        raise GoTemplateError(f"can't evaluate field {name} in {type(obj).__name__}")

    def operand(self, w, dot):
        if w.startswith('"'):
            return bytes(w[1:-1], "utf-8").decode("unicode_escape")
        if re.fullmatch(r"-?\d+", w):
            return int(w)
        if w in ("true", "false"):
            return w == "true"
        if w == ".":
            return dot
        if w.startswith("."):
            v = dot
            for f in w[1:].split("."):
                v = self.field(v, f)
            return v
        if w.startswith("$"):
            name, *fields = w.split(".")
            v = self.lookup(name)
            for f in fields:
                v = self.field(v, f)
            return v
        raise GoTemplateError(f"unknown operand {w!r}")

    def pipeline(self, words, dot):
        """One command (no `|` pipes: Ollama's templates here use none)."""
        args, i = [], 0
        while i < len(words):
            if words[i] == "(":
                depth, j = 1, i + 1
                while depth:
                    depth += {"(": 1, ")": -1}.get(words[j], 0)
                    j += 1
                args.append(("value", self.pipeline(words[i + 1:j - 1], dot)))
                i = j
            else:
                args.append(("word", words[i]))
                i += 1
        if args and args[0][0] == "word" and args[0][1] in ("and", "or"):
            v = None
            for a in args[1:]:  # Go 1.18+: stops at the first argument that decides
                v = a[1] if a[0] == "value" else self.operand(a[1], dot)
                if _truth(v) == (args[0][1] == "or"):
                    return v
            return v
        if args and args[0][0] == "word" and args[0][1] in _FUNCS:
            vals = [a[1] if a[0] == "value" else self.operand(a[1], dot) for a in args[1:]]
            return _FUNCS[args[0][1]](*vals)
        if len(args) != 1:
            raise GoTemplateError(f"cannot run {words}")
        return args[0][1] if args[0][0] == "value" else self.operand(args[0][1], dot)

    def expr(self, text, dot):
        mm = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.*)", text, re.S)
        if mm:
            value = self.pipeline(_WORD.findall(mm.group(3)), dot)
            if mm.group(2) == ":=":
                self.scopes[-1][mm.group(1)] = value
            else:
                self.assign(mm.group(1), value)
            return None, True
        return self.pipeline(_WORD.findall(text), dot), False

    def run(self, nodes, dot) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "act":
                v, silent = self.expr(node[1], dot)
                if not silent:
                    out.append(_show(v))
            elif node[0] == "if":
                for cond, body in node[1]:
                    if cond is None or _truth(self.expr(cond, dot)[0]):
                        self.scopes.append({})
                        out.append(self.run(body, dot))
                        self.scopes.pop()
                        break
            else:
                _, decl, rest, body = node
                seq = self.expr(rest, dot)[0] or []
                for i, item in enumerate(seq):
                    scope = {}
                    if len(decl) == 1:
                        scope[decl[0]] = item
                    elif len(decl) == 2:
                        scope[decl[0]], scope[decl[1]] = i, item
                    self.scopes.append(scope)
                    out.append(self.run(body, item))
                    self.scopes.pop()
        return "".join(out)


def render(template: str, messages: list[dict]) -> str:
    """The prompt Ollama renders from a Modelfile TEMPLATE for a chat request of these messages
    (a SYSTEM line is a system message put first when the request has none: prepend it)."""
    root = ollama_values(messages)
    return _Exec(root).run(_parse(template), root)
