"""The shell commands of the READMEs' ```bash blocks, and their shapes (for tests/test_readme_commands.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READMES = {"en": ROOT / "README.md", "zh": ROOT / "README.zh.md"}
PROGRAMS = ("lmforge", "make", "python", "torchrun", "pip")
# Words that name a command rather than an argument of one: lmforge's commands (and actions), make's targets.
COMMAND_WORDS = frozenset(
    "quickstart generate chat info tokenizer train data prepare pretrain finetune classify summarize embed eval "
    "list show rm cp tag import verify gc export serve estimate select demo test install".split()
)


def shell_commands(readme: Path) -> list[list[str]]:
    """Every command of the README's bash blocks as an argv, in order: lines continued with a backslash are
    joined, comments dropped, and ``a && b`` or ``a ; b`` are two commands."""
    commands: list[list[str]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", readme.read_text(encoding="utf-8"), re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            command: list[str] = []
            for token in [*tokens, ";"]:
                if token not in ("&&", ";"):
                    command.append(token)
                elif command:
                    assert command[0] in PROGRAMS, f"{readme.name}: a command of an unknown program: {line}"
                    commands.append(command)
                    command = []
    return commands


def shape(argv: list[str]) -> tuple[str, tuple[str, ...], frozenset[str]]:
    """A command's shape: its program, the command words it runs, and the flags it uses (values left out)."""
    words = tuple(token for token in argv[1:] if token in COMMAND_WORDS)
    flags = frozenset(token.split("=")[0] for token in argv[1:] if token.startswith("-"))
    return argv[0], words, flags


def table_commands(readme: Path) -> list[str]:
    """The command column of the README's command table: each `lmforge ...` cell's backticked commands."""
    cells = re.findall(r"^\| (`lmforge.*?`(?: / `lmforge.*?`)*) \|", readme.read_text(encoding="utf-8"), re.M)
    return [command for cell in cells for command in re.findall(r"`([^`]+)`", cell)]
