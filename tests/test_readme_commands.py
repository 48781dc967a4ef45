"""The README's commands parse: every `hdistill` command line of its bash blocks names options that exist,
with values their types accept (click parses them as the CLI would, and the --loss, --target and
--encoding values go through their parsers, without running the command)."""
import re
import shlex
from pathlib import Path

import pytest

from hdistill.cli import cli
from hdistill.common.targets import parse_targets
from hdistill.shards.encoding import parse_encodings
from hdistill.train.loss import parse_losses

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The arguments after `hdistill` of every command line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "hdistill" in words:
                commands.append(words[words.index("hdistill") + 1:])
    return commands


def test_the_readme_shows_commands():
    names = [c[0] for c in readme_commands()]
    assert names.count("precompute") >= 4 and names.count("train") >= 10


EXISTING = ("--shards", "--val-shards")     # options whose type wants an existing store folder


def with_stores(args: list[str], folder: Path) -> list[str]:
    """The store folders the README names stand for stores it made before: make them exist under `folder`."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in EXISTING:
            store = folder / out[i + 1].strip("/").replace("/", "_")
            store.mkdir(exist_ok=True)
            out[i + 1] = str(store)
    return out


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_a_readme_command_parses(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # relative --out folders land here if a type creates anything
    name, rest = args[0], with_stores(args[1:], tmp_path)
    assert name in cli.commands, f"hdistill {name}: no such command"
    params = cli.commands[name].make_context(name, rest).params
    parse_losses(params.get("losses") or ())              # the values the command parses itself
    parse_targets(params.get("targets") or ())
    parse_encodings(params.get("encodings") or ())
