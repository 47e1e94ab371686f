"""The shell blocks of a Markdown file, as scripts to run.

A fenced block in ``bash``, ``sh`` or ``console`` is a shell block. It runs unless a marker with a reason stands on
its own line just before the opening fence (blank lines aside)::

    <!-- readme-test: skip (starts the stack itself, in the foreground) -->

A ``console`` block runs its ``$ `` lines (and their ``\\`` continuations); the other lines are output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SHELL_LANGUAGES = frozenset({"bash", "sh", "console"})
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"<!--\s*readme-test:(?P<body>.*?)-->")
_SKIP = re.compile(r"^\s*skip\s*\((?P<reason>.*)\)\s*$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, counted from 1
    language: str  # the first word of the fence's info string, "" when none
    text: str  # the lines between the fences, the fence's indentation removed

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    def script(self) -> str:
        """What bash runs for this block."""
        if self.language != "console":
            return self.text
        commands: list[str] = []
        continuing = False
        for line in self.text.splitlines():
            if continuing or line.startswith("$ "):
                commands.append(line if continuing else line[2:])
                continuing = line.endswith("\\")
        return "\n".join(commands) + "\n" if commands else ""


@dataclass(frozen=True)
class Marker:
    line: int
    body: str  # what follows "readme-test:"
    block: Block | None  # the block it stands before, if it stands right before one

    @property
    def skip_reason(self) -> str | None:
        """The reason of a well-formed skip marker (stripped; may be empty), else None."""
        match = _SKIP.match(self.body)
        return match["reason"].strip() if match else None


def parse(markdown: str) -> tuple[list[Block], list[Marker]]:
    """Every fenced block, and every ``readme-test:`` marker line with the block it stands before.

    A marker is a line of its own; the same text inside a sentence is prose about markers.
    """
    lines = markdown.splitlines()
    blocks: list[Block] = []
    markers: list[Marker] = []
    pending: list[tuple[int, str]] = []  # markers not yet followed by anything but blank lines
    index = 0
    while index < len(lines):
        line = lines[index]
        opening = _FENCE.match(line)
        if opening:
            indent, fence = opening["indent"], opening["fence"]
            closing = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            body: list[str] = []
            end = index + 1
            while end < len(lines) and not closing.match(lines[end]):
                text = lines[end]
                body.append(text[len(indent) :] if text.startswith(indent) else text.lstrip())
                end += 1
            info = opening["info"].split()
            block = Block(line=index + 1, language=info[0].lower() if info else "", text="\n".join(body) + "\n")
            blocks.append(block)
            markers.extend(Marker(number, text, block) for number, text in pending)
            pending = []
            index = end + 1
            continue
        marker = _MARKER.fullmatch(line.strip())
        if marker:
            pending.append((index + 1, marker["body"]))
        elif line.strip():
            markers.extend(Marker(number, text, None) for number, text in pending)
            pending = []
        index += 1
    markers.extend(Marker(number, text, None) for number, text in pending)
    return blocks, markers


def runnable(markdown: str) -> list[Block]:
    """The shell blocks that no skip marker stands before."""
    blocks, markers = parse(markdown)
    skipped = {marker.block.line for marker in markers if marker.block is not None and marker.skip_reason}
    return [block for block in blocks if block.is_shell and block.line not in skipped]
