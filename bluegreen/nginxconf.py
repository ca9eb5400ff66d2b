"""A small reader of nginx configuration text (pure): directives and blocks with their offsets, so that a
server block written by hand can get bluegreen's lines inserted without touching anything else in it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

MAX_DEPTH = 64  # nginx itself nests far less; deeper input is refused, never recursed into


class ConfSyntax(ValueError):
    """Text this reader cannot follow (an unclosed block or quote): nothing is edited."""


@dataclass
class Directive:
    """One directive: `name args;` or `name args { children }`; offsets index the text it was read from."""

    name: str
    args: list[str]
    start: int  # offset of the name
    end: int  # offset just past the `;` or the closing `}`
    body: int = -1  # offset just past `{` for a block, else -1
    children: list["Directive"] = field(default_factory=list)
    parent: "Directive | None" = field(default=None, repr=False)

    @property
    def is_block(self) -> bool:
        return self.body >= 0

    def walk(self) -> Iterator["Directive"]:
        for child in self.children:
            yield child
            yield from child.walk()

    def chain(self) -> list["Directive"]:
        """This directive and its enclosing blocks, innermost first."""
        out, node = [], self
        while node is not None:
            out.append(node)
            node = node.parent
        return out


_SPACE = " \t\r\n"


def _tokens(text: str) -> Iterator[tuple[str, int, bool]]:
    """(token, offset, quoted) for words and the delimiters `{`, `}`, `;`; comments are skipped.

    As nginx's own reader (ngx_conf_read_token): a quote opens a string only at the start of a word, and a `#`
    a comment only there; inside a word, quotes, `#` and `}` are ordinary characters (`don't`, `a}b`). A word
    ends at a space, `;` or `{` (but `${` is part of it); a backslash takes the next character along."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c in "{};":
            yield c, i, False
            i += 1
        elif c in "\"'":
            j, out = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    out.append(text[j + 1])
                    j += 2
                    continue
                out.append(text[j])
                j += 1
            if j >= n:
                raise ConfSyntax(f"a quote opened at offset {i} is never closed")
            yield "".join(out), i, True
            i = j + 1
        else:
            j, variable = i, False
            while j < n:
                ch = text[j]
                if ch == "\\" and j + 1 < n:
                    j, variable = j + 2, False
                    continue
                if ch == "{" and variable:  # ${var}
                    j += 1
                    continue
                if ch in _SPACE or ch in ";{":
                    break
                variable = ch == "$"
                j += 1
            yield text[i:j], i, False
            i = j


def parse(text: str) -> Directive:
    """The whole text as one root block (name ""); raises ConfSyntax for text nginx would not accept either."""
    root = Directive("", [], 0, len(text), body=0)
    stack = [root]
    words: list[tuple[str, int]] = []
    for token, offset, quoted in _tokens(text):
        if not quoted and token == ";":
            if not words:
                continue  # a stray ';' (nginx refuses it; nothing to attach it to here)
            node = Directive(words[0][0], [w for w, _ in words[1:]], words[0][1], offset + 1, parent=stack[-1])
            stack[-1].children.append(node)
            words = []
        elif not quoted and token == "{":
            if not words:
                raise ConfSyntax(f"a block without a name at offset {offset}")
            if len(stack) >= MAX_DEPTH:
                raise ConfSyntax(f"blocks nested deeper than {MAX_DEPTH}")
            node = Directive(words[0][0], [w for w, _ in words[1:]], words[0][1], -1, body=offset + 1, parent=stack[-1])
            stack[-1].children.append(node)
            stack.append(node)
            words = []
        elif not quoted and token == "}":
            if len(stack) == 1 or words:
                raise ConfSyntax(f"an unexpected '}}' at offset {offset}")
            stack.pop().end = offset + 1
        else:
            words.append((token, offset))
    if len(stack) != 1 or words:
        raise ConfSyntax("a block is never closed, or the last directive lacks its ';'")
    return root


def proxies_to(node: Directive, upstream: str) -> bool:
    """`proxy_pass http://UPSTREAM` (optionally with a URI part) naming this upstream (nginx compares the
    scheme and upstream names without regard to case)."""
    if node.name != "proxy_pass" or len(node.args) != 1:
        return False
    return re.fullmatch(r"https?://" + re.escape(upstream) + r"(?:/.*)?", node.args[0],
                        re.IGNORECASE | re.DOTALL) is not None


def own(node: Directive, name: str) -> list[Directive]:
    """The directives `name` set directly in block `node` (nginx inherits some only when a level sets none)."""
    return [c for c in node.children if c.name == name]


_INDENT = re.compile(r"[ \t]*")


def line_indent(text: str, offset: int) -> str:
    start = text.rfind("\n", 0, offset) + 1
    return _INDENT.match(text, start).group(0)  # type: ignore[union-attr]  # matches always (maybe empty)
