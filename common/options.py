"""Command-line options declared once, on the fields of the config dataclasses.

A field made with `option(...)` carries its option's help, click type and parser in its metadata, so the
flags of a command, their defaults, the keys of a --config YAML file and the config.yaml a command writes
are one list by construction (as timm's train.py keeps one argparse list for its flags and args.yaml):

    @dataclass
    class TrainConfig:
        batch_size: int = option(256, "Samples per optimiser step, global: over all ranks.", type=click.IntRange(min=1))

    @command_options(TrainConfig)          # --batch-size INTEGER  [default: 256]
    def train(**params): cfg = from_params(TrainConfig, params)

A field's option is --<field with dashes> unless it names another (`flag="--loss"` for the repeatable
`losses`); a YAML key is the option's name with underscores (`batch_size`, `loss`), dashes accepted. Values
travel in the command line's form (the text of "--relation-blocks 9,10") and become the field's value through
its `parse`; `cli` is that form of a default the field holds parsed (the student's mean as "R,G,B").
This module imports click only, so `hdistill --help` stays fast.
"""
from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable

import click

from .errors import HdistillError


@dataclass(frozen=True)
class Option:
    help: str
    type: Any = None                       # a click type; None: click's from the default
    flag: str | None = None                # the long option when it is not --<field with dashes>; "--a/--b" pairs
    multiple: bool = False
    is_flag: bool = False
    metavar: str | None = None
    parse: Callable[[Any, str], Any] | None = None   # (command-line value, option name) -> the field's value
    cli: Any = None                        # the command line's default when the field's default is parsed

    def name(self, field_name: str) -> str:
        return (self.flag or "--" + field_name.replace("_", "-")).split("/")[0]


def option(default=MISSING, help: str = "", *, default_factory=MISSING, **kw):
    """A dataclass field that is also a command-line option (see the module docstring)."""
    return field(default=default, default_factory=default_factory, metadata={"option": Option(help, **kw)})


def option_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def option_name(cls, field_name: str) -> str:
    """The command-line name of a field: "--loss" for TrainConfig.losses."""
    return next(f.metadata["option"].name(f.name) for f in option_fields(cls) if f.name == field_name)


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata["option"].name(f.name).lstrip("-").replace("-", "_")


def cli_default(f: dataclasses.Field):
    opt = f.metadata["option"]
    if opt.cli is not None:
        return opt.cli
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return tuple(value) if opt.multiple else value
    return MISSING


def click_option(f: dataclasses.Field):
    opt = f.metadata["option"]
    default = cli_default(f)
    kw = dict(help=opt.help, multiple=opt.multiple, metavar=opt.metavar, show_default=not opt.multiple)
    if default is MISSING:
        kw["required"] = True
    else:
        kw["default"] = default
    if opt.is_flag and "/" not in (opt.flag or ""):
        kw["is_flag"] = True
    if opt.type is not None:
        kw["type"] = opt.type
    return click.option(opt.flag or opt.name(f.name), f.name, **kw)


def command_options(*classes):
    """The click options of every option field of `classes`, in field order."""
    def decorate(fn):
        for cls in reversed(classes):
            for f in reversed(option_fields(cls)):
                fn = click_option(f)(fn)
        return fn
    return decorate


def from_params(cls, params: dict):
    """An instance of `cls` from a command's parameters (command-line form), through each field's parser."""
    values = {}
    for f in option_fields(cls):
        opt, value = f.metadata["option"], params[f.name]
        value = list(value) if opt.multiple else value
        values[f.name] = opt.parse(value, opt.name(f.name)) if opt.parse else value
    return cls(**values)


def cli_values(classes, params: dict) -> dict:
    """The YAML form of a command's options: {yaml key: command-line value}, in field order."""
    return {yaml_key(f): list(v) if isinstance(v := params[f.name], tuple) else v
            for cls in classes for f in option_fields(cls)}


def fields_by_key(classes) -> dict[str, dataclasses.Field]:
    """{YAML key or field name: field} of the option fields of `classes` (`loss` and `losses` both name one)."""
    return {key: f for cls in classes for f in option_fields(cls) for key in (yaml_key(f), f.name)}


def params_from_yaml(classes, values: dict, where: str) -> dict:
    """{field name: value} from a mapping of YAML keys (an unknown key is refused, naming `where`)."""
    by_key = fields_by_key(classes)
    out = {}
    for key, value in values.items():
        f = by_key.get(str(key).lstrip("-").replace("-", "_"))
        if f is None:
            raise HdistillError(f"{where}: no option {key!r}")
        opt = f.metadata["option"]
        if opt.multiple:
            out[f.name] = [_convert(f, v, where) for v in (value if isinstance(value, (list, tuple)) else [value])]
        else:
            out[f.name] = _convert(f, value, where)
    return out


def _convert(f: dataclasses.Field, value, where: str):
    """A YAML value through its option's click type, as the command line's text would go."""
    if value is None:
        return None
    opt, default = f.metadata["option"], cli_default(f)
    kind = click.types.convert_type(opt.type, None if default is MISSING or opt.multiple else default)
    if opt.is_flag or "/" in (opt.flag or ""):
        kind = click.BOOL
    try:
        return kind.convert(value, None, None)
    except click.BadParameter as err:
        raise HdistillError(f"{where}: {opt.name(f.name)} {value!r}: {err.message}") from None


# ---------------------------------------------------------------- options every command that runs has

def read_retries_option():
    """--read-retries N: a Retry of N attempts."""
    from .storage import Retry
    return option(default_factory=Retry, flag="--read-retries", cli=5, type=click.IntRange(min=0),
                  parse=lambda attempts, _: Retry(attempts=int(attempts)),
                  help="Reads from object storage that fail transiently (a dropped connection, a timeout) are retried "
                       "this many times, waiting 1, 2, 4, ... s (at most 30 s); then the run stops naming the object.")


def quiet_option():
    return option(False, "No progress bar (on a terminal) and no progress lines (otherwise, e.g. under SLURM).",
                  is_flag=True)


# ---------------------------------------------------------------- click types

class StorePlace(click.ParamType):
    """A store folder: a local path (checked like click.Path) or an s3://, gs:// or http(s):// URL (checked when
    it is opened, before any model is built)."""

    name = "PATH|URL"

    def __init__(self, exists: bool):
        self.local = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        from hdistill.common.storage import is_url
        return str(value) if is_url(value) else self.local.convert(value, param, ctx)


class LocalFolder(click.Path):
    """A local folder; a URL is refused with a clear message (rather than made into a folder named 's3:'), and so
    is a path below a file."""

    def __init__(self, what: str):
        super().__init__(file_okay=False)
        self.what = what

    def convert(self, value, param, ctx):
        from hdistill.common.storage import check_local_folder, is_url
        if is_url(value):
            self.fail(f"{value}: {self.what} is a local (or shared file system) folder, not a URL", param, ctx)
        try:
            check_local_folder(value, "")
        except HdistillError as err:
            self.fail(str(err).strip(), param, ctx)
        return super().convert(value, param, ctx)


# ---------------------------------------------------------------- parsers: (command-line value, option) -> value

def absolute_place(value, _option: str = ""):
    """A place as a recorded config keeps it: a local path made absolute (inspect, --online, and --config of a
    written config.yaml then find it from any working directory); URLs, tar patterns' URLs, synthetic:N and None as
    given."""
    from .storage import is_url
    if value is None or is_url(value) or str(value).startswith("synthetic:"):
        return value
    return os.path.abspath(value)


def split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_list(value, option: str) -> list[str]:
    """"a,b" (or a YAML list) -> ["a", "b"]."""
    items = [str(v) for v in value] if isinstance(value, (list, tuple)) else split(str(value))
    if not items:
        raise HdistillError(f"{option}: expected a comma-separated list, got {value!r}")
    return items


def parse_ints(value, option: str) -> list[int] | None:
    """"-3,-2" (or a YAML list) -> [-3, -2]; None stays None."""
    if value is None:
        return None
    try:
        return [int(v) for v in (value if isinstance(value, (list, tuple)) else split(str(value)))]
    except ValueError:
        raise HdistillError(f"{option} {value!r}: expected comma-separated integers, e.g. -3,-2") from None


def parse_rgb(value, option: str) -> tuple[float, float, float]:
    try:
        rgb = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else split(str(value))))
    except ValueError:
        rgb = ()
    if len(rgb) != 3:
        raise HdistillError(f"{option} {value!r}: expected three comma-separated numbers (R,G,B)")
    return rgb


def parse_value(text: str):
    """timm-style keyword values: Python literals where they parse, strings otherwise."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_pairs(values, option: str) -> dict[str, str]:
    """["mae=PATH", ...] -> {"mae": "PATH"}."""
    out = {}
    for value in values:
        key, sep, rest = str(value).partition("=")
        if not sep or not key or not rest:
            raise HdistillError(f"{option} {value!r}: expected KEY=VALUE")
        out[key] = rest
    return out


def parse_kwargs(values, option: str) -> dict:
    """["depth=6", ...] -> {"depth": 6} (timm constructor arguments)."""
    return {key: parse_value(text) for key, text in parse_pairs(values, option).items()}


def parse_role_kwargs(values, option: str) -> dict[str, dict]:
    """["mae.depth=6", ...] -> {"mae": {"depth": 6}}."""
    out: dict[str, dict] = {}
    for key, text in parse_pairs(values, option).items():
        role, dot, name = key.partition(".")
        if not dot or not role or not name:
            raise HdistillError(f"{option} {key}={text}: expected ROLE.KEY=VALUE, e.g. mae.depth=6")
        out.setdefault(role, {})[name] = parse_value(text)
    return out


def parse_block_pairs(value, option: str) -> dict[int, int] | None:
    """"9=5,10=6" -> {9: 5, 10: 6}; None stays None."""
    if value is None:
        return None
    try:
        return {int(t): int(v) for t, _, v in (pair.partition("=") for pair in split(str(value)))}
    except ValueError:
        raise HdistillError(f"{option} {value!r}: expected TEACHER=STUDENT block pairs, e.g. 9=5,10=6") from None


def parse_or_none(values, option: str) -> list | None:
    """A repeatable option's values, None when it was not given (the command's default applies)."""
    return list(values) or None


def options_yaml(values: dict) -> bytes:
    """A command's options (cli_values) as the YAML that --config loads again, keys in field order."""
    import yaml
    return yaml.safe_dump(values, sort_keys=False).encode()
