"""The README's commands parse: every `hdistill` command line of its bash blocks names options that exist,
with values their types accept (click parses them as the CLI would, and the --loss, --target and
--encoding values go through their parsers, without running the command)."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

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


def readme_sweeps() -> dict[str, str]:
    """The README's sweep files: its yaml blocks whose first line is `# NAME.yaml: ...`."""
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (\S+\.yaml)", block))}


def test_the_readme_shows_commands():
    names = [c[0] for c in readme_commands()]
    assert names.count("precompute") >= 4 and names.count("train") >= 10


EXISTING = ("--shards", "--val-shards")     # options whose type wants an existing store folder
EXISTING_FILES = ("--student-weights",)     # options whose type wants an existing file


def with_stores(args: list[str], folder: Path) -> list[str]:
    """The store folders and trained students the README names stand for what it made before: make them exist under
    `folder`."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in EXISTING + EXISTING_FILES:
            made = folder / out[i + 1].strip("/").replace("/", "_")
            if word in EXISTING:
                made.mkdir(exist_ok=True)
            else:
                made.touch()
            out[i + 1] = str(made)
    return out


@pytest.mark.parametrize("args", readme_commands(), ids=lambda a: " ".join(a)[:80])
def test_a_readme_command_parses(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # relative --out folders land here if a type creates anything
    for file, text in readme_sweeps().items():      # with the stores it names made to exist
        data = yaml.safe_load(text)
        data.update({k: with_stores([f"--{k.replace('_', '-')}", data[k]], tmp_path)[1]
                     for k in ("shards", "val_shards") if k in data})
        (tmp_path / file).write_text(yaml.safe_dump(data))
    name, rest = args[0], with_stores(args[1:], tmp_path)
    assert name in cli.commands, f"hdistill {name}: no such command"
    params = cli.commands[name].make_context(name, rest).params
    parse_losses(params.get("losses") or ())              # the values the command parses itself
    parse_targets(params.get("targets") or ())
    parse_encodings(params.get("encodings") or ())


def test_the_readme_sweeps_parse(tmp_path):
    from hdistill.common.options import params_from_yaml
    from hdistill.train.config import TrainConfig
    from hdistill.train.sweep import check_members
    sweeps = readme_sweeps()
    assert set(sweeps) == {"t6.yaml", "t8.yaml", "baselines.yaml"}
    for file, text in sweeps.items():
        data = yaml.safe_load(text)
        for name, overrides in check_members(data.pop("members"), file):
            parse_losses(params_from_yaml([TrainConfig], overrides, name).get("losses") or ())
