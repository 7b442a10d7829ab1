"""Settings dataclasses are the one list of a recipe's settings: CLI flags, YAML keys and keyword arguments.

A field is written once: its name (``max_steps`` is ``--max-steps`` on the command line and ``max_steps:`` in
YAML), its type (which parses the flag and checks the YAML value), its default and its help text. The CLI
builds flags with ``add_flags`` and reads them back with ``settings_from``, which lays the flags the user gave
over the YAML file's values; a recipe's Python function passes its keyword arguments through ``settings_from``
too, so all three faces accept the same names and refuse the same typos with the same error.

Field metadata read here (all optional):

    help          one line for ``--help``; the default is appended, e.g. "(default: 1000)"
    default_help  what a default of None means, shown instead of "none" ("the model's context length")
    cli           False: a YAML / Python setting without a flag
    positional    the flag is an optional positional argument
    renamed_from  an old name, still accepted as flag, YAML key and keyword, with a deprecation warning;
    renamed_why   ... and the reason for the new name, shown in that warning
    flag_prefix   a nested dataclass's flags get this prefix ("lora-" -> --lora-rank); "" keeps their names
    title         a nested dataclass's argument group in ``--help``
    skip_flags    names inside a nested dataclass that get no flag (the outer settings have their own)
    flags_from    for a mapping field: (dataclass, names) whose flags set those keys of the mapping
    per_process   True for a setting of how this process runs (device, progress bar), not of the run:
                  given with ``--resume``, it takes effect without ``--override``

``--resume`` continues a run as it was: ``resumed`` lays the settings recorded in the run's checkpoint under the
ones the user gave (``given_settings``), and a given setting that differs from the record is one error naming
its flags, unless ``override`` names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import numbers
import operator
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from lmforge.errors import LmforgeError

T = TypeVar("T")
# Flags named apart from their field: every command names where it writes ``--out`` (``export``, ``eval``,
# ``data prepare`` too); TrainConfig's field keeps the name its YAML key and keyword have (a folder). The old
# flag still works for one release, with a deprecation line.
FLAG_NAMES = {"out_dir": ("out", "every command names its output --out")}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of settings, with one-line errors for a missing file, bad syntax or a non-mapping.

    Which keys are allowed is the settings dataclass's business (``settings_from``), not the file reader's.
    """
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file", hint="check the path of the YAML config") from None
    except yaml.YAMLError as e:
        raise LmforgeError(
            f"{path}: not valid YAML ({e})".replace("\n", " "), hint="fix the YAML syntax"
        ) from None
    if not isinstance(values, dict):
        raise LmforgeError(f"{path}: expected a mapping of settings", hint="write one `key: value` per line")
    return values


# ------------------------------------------------------------------ flags
def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    title: str | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls`` (``max_steps`` -> ``--max-steps``).

    Every flag defaults to None, so ``settings_from`` can tell a flag the user gave from one left alone (which
    must not override the YAML file). A nested dataclass field gets its own argument group.
    """
    _add_flags(parser, cls, skip=skip, only=only, title=title, prefix="", dest="", default_help=None)


def _add_flags(
    parser: Any,
    cls: type,
    *,
    skip: tuple[str, ...],
    only: tuple[str, ...] | None,
    title: str | None,
    prefix: str,
    dest: str,
    default_help: str | None,
) -> None:
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, hints[f.name]
        if f.name in skip or (only is not None and f.name not in only) or meta.get("cli", True) is False:
            continue
        if dataclasses.is_dataclass(kind):
            _add_flags(
                parser,
                kind,
                skip=tuple(meta.get("skip_flags", ())),
                only=None,
                title=meta.get("title"),
                prefix=prefix + meta.get("flag_prefix", f.name.replace("_", "-") + "-"),
                dest=f"{dest}{f.name}.",
                default_help=None,
            )
            continue
        if "flags_from" in meta:
            source, names = meta["flags_from"]
            _add_flags(
                parser,
                source,
                skip=(),
                only=tuple(names),
                title=meta.get("title"),
                prefix=prefix,
                dest=f"{dest}{f.name}.",
                default_help=meta.get("default_help"),  # the other dataclass's defaults do not apply
            )
            continue
        flag, renamed = prefix + f.name.replace("_", "-"), None
        if f.name in FLAG_NAMES:
            renamed, (name, why) = "--" + flag, FLAG_NAMES[f.name]
            flag = prefix + name
        options: dict[str, Any] = {"dest": dest + f.name, "default": None, "help": _help(f, default_help)}
        options.update(_parse_options(kind, f"{cls.__name__}.{f.name}"))
        if options.get("action") is None:
            options.pop("action", None)
            options["metavar"] = f.name.upper() if "choices" not in options else None
        if meta.get("positional"):
            group.add_argument(options.pop("dest"), nargs="?", **options)
            continue
        group.add_argument("--" + flag, **options)
        if "renamed_from" in meta:
            old = "--" + prefix + meta["renamed_from"].replace("_", "-")
            action = renamed_flag(old, "--" + flag, meta.get("renamed_why"))
            group.add_argument(old, **{**options, "help": argparse.SUPPRESS, "action": action})
        if renamed:
            action = renamed_flag(renamed, "--" + flag, why)
            group.add_argument(renamed, **{**options, "help": argparse.SUPPRESS, "action": action})


def renamed_flag(old: str, new: str, why: str | None = None) -> type[argparse.Action]:
    """An argparse action for the old spelling of a renamed flag: stores like the new one, after one line on
    stderr. Give it the new flag's dest, type and default, and ``help=argparse.SUPPRESS``."""
    notice = f"warning: {old} is deprecated, use {new}" + (f" ({why})" if why else "")

    class RenamedFlag(argparse.Action):
        def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
            print(notice, file=sys.stderr)
            setattr(namespace, self.dest, values)

    return RenamedFlag


def _help(f: dataclasses.Field, default_help: str | None = None) -> str:
    text = f.metadata.get("help", "")
    if default_help is not None:
        return f"{text} (default: {default_help})".strip().replace("%", "%%")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return text.replace("%", "%%")
    if default is None:
        shown = f.metadata.get("default_help", "none")
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, list | tuple):
        shown = ",".join(map(str, default)) or f.metadata.get("default_help", "none")
    elif default == "":
        shown = '""'
    else:
        shown = str(default)
    return f"{text} (default: {shown})".strip().replace("%", "%%")


def _parse_options(kind: Any, where: str) -> dict[str, Any]:
    """argparse options (type, choices, action) for a field's type."""
    kind = _without_none(kind)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return {"type": type(choices[0]), "choices": choices}
    if typing.get_origin(kind) is list:
        return {"type": _comma_list}
    if kind in (int, float, str):
        return {"type": kind}
    if kind is Path or (_is_union(kind) and all(k in (str, Path) for k in typing.get_args(kind))):
        return {"type": str}
    raise TypeError(f"{where}: no flag for a field of type {kind}; give it metadata cli=False")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (Union, types.UnionType)


def _without_none(kind: Any) -> Any:
    if not _is_union(kind):
        return kind
    rest = [k for k in typing.get_args(kind) if k is not type(None)]
    return functools.reduce(operator.or_, rest)


# --------------------------------------------------------------- settings
def settings_from(
    args: argparse.Namespace | None,
    values: Mapping[str, Any] | None,
    cls: type[T],
    *,
    source: str | Path = "settings",
    warn: Callable[[str], None] | None = None,
) -> T:
    """An instance of ``cls`` from ``values`` (a YAML mapping or keyword arguments) with the flags in ``args``
    that the user gave laid over them.

    Unknown keys are one error naming them all and listing the known ones; a value of the wrong type is one
    error naming every such key. Renamed keys still work, with ``warn`` told (default: a DeprecationWarning).
    """
    flags = {k: v for k, v in vars(args).items() if v is not None} if args is not None else {}
    problems: list[str] = []
    settings = _build(
        cls, values, flags, dest="", source=str(source), warn=warn or _deprecation_warning, problems=problems
    )
    if problems:
        raise LmforgeError(f"{source}: " + "; ".join(problems), hint="fix the values named")
    return typing.cast(T, settings)


def _build(
    cls: type[T],
    values: Any,
    flags: dict[str, Any],
    *,
    dest: str,
    source: str,
    warn: Callable[[str], None],
    problems: list[str],
) -> Any:
    """``cls`` from ``values`` and ``flags``; bad values go to ``problems`` (then the result is unused)."""
    if isinstance(values, cls):
        if not any(k.startswith(dest) for k in flags):
            return values  # a ready TrainConfig / LoRAConfig from Python, no flags to lay over it
        values = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls)}
    where = f" in {dest.rstrip('.')}" if dest else ""
    if values is None:
        values = {}
    elif not isinstance(values, Mapping):
        problems.append(f"{dest.rstrip('.') or 'the settings'} must be a mapping of settings, not {values!r}")
        values = {}
    values = dict(values)
    fields = dataclasses.fields(cls)
    for f in fields:
        old = f.metadata.get("renamed_from")
        if old in values:
            if f.name in values:
                raise LmforgeError(
                    f"{source}: both {old} and {f.name} given{where}", hint=f"keep only {f.name}"
                )
            values[f.name] = values.pop(old)
            why = f" ({f.metadata['renamed_why']})" if f.metadata.get("renamed_why") else ""
            warn(f"{source}: {old} is deprecated, use {f.name}{why}")
    known = [f.name for f in fields]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise LmforgeError(
            f"{source}: unknown keys {', '.join(map(str, unknown))}{where}",
            hint=f"known keys: {', '.join(known)}",
        )
    hints = typing.get_type_hints(cls)
    before = len(problems)
    for f in fields:
        kind, key = hints[f.name], dest + f.name
        if dataclasses.is_dataclass(kind):
            given = any(k.startswith(key + ".") for k in flags)
            if f.name in values or given:
                values[f.name] = _build(
                    kind,
                    values.get(f.name),
                    flags,
                    dest=key + ".",
                    source=source,
                    warn=warn,
                    problems=problems,
                )
            continue
        if "flags_from" in f.metadata:
            extra = {k[len(key) + 1 :]: v for k, v in flags.items() if k.startswith(key + ".")}
            if extra:
                values[f.name] = {**dict(values.get(f.name) or {}), **extra}
            continue
        if key in flags:
            values[f.name] = flags[key]
        elif f.name in values:
            values[f.name], problem = _checked(values[f.name], kind)
            if problem:
                problems.append(f"{key} {problem}")
    if len(problems) > before:
        return None  # settings_from raises, naming every problem
    return cls(**values)


def _checked(value: Any, kind: Any) -> tuple[Any, str | None]:
    """``value`` as the field's type where YAML gives a near miss (``lr: 1e-3`` is a string to YAML 1.1), or
    a problem to report. Only plain types are checked; anything else is the dataclass's to validate."""
    if value is None:
        return value, None if _is_union(kind) and type(None) in typing.get_args(kind) else "must not be empty"
    kind = _without_none(kind)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return (
            value,
            None if value in choices else f"must be one of {', '.join(map(str, choices))}, not {value!r}",
        )
    if kind is bool:
        return value, None if isinstance(value, bool) else f"must be true or false, not {value!r}"
    if kind in (int, float):
        wanted = "an integer" if kind is int else "a number"
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                return value, f"must be {wanted}, not {value!r}"
        number = numbers.Integral if kind is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, number):
            return value, f"must be {wanted}, not {value!r}"
        return kind(value), None
    if kind is str:
        return value, None if isinstance(value, str | os.PathLike) else f"must be text, not {value!r}"
    if typing.get_origin(kind) is list and isinstance(value, str):
        return _comma_list(value), None  # `targets: q_proj,v_proj` reads like the flag
    return value, None


def _deprecation_warning(message: str) -> None:
    # Point the warning at the caller's line, the first frame outside lmforge (pandas' find_stack_level).
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "lmforge":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


# ------------------------------------------------------------------ resume
def resume_field() -> Any:
    """The ``resume`` setting of every training recipe's settings."""
    return dataclasses.field(
        default=False,
        metadata={
            "help": "continue the run in --out from its newest checkpoint, with the run's settings",
            "per_process": True,
        },
    )


def override_field() -> Any:
    """The ``override`` setting of every training recipe's settings: what ``--resume`` may change."""
    return dataclasses.field(
        default_factory=list,
        metadata={
            "help": "with --resume: settings that may differ from the run's, as flags (max-steps,lr)",
            "per_process": True,
        },
    )


def given_settings(args: argparse.Namespace | None, values: Any, cls: type) -> frozenset[str]:
    """Dotted names (``train.max_steps``, ``model_config.n_layer``) of the settings the user gave: the flags in
    ``args`` that are set, the keys of a YAML mapping or keyword arguments, and for a ready dataclass instance
    the fields that differ from their defaults (from Python, that is all one can tell)."""
    given = {k for k, v in vars(args).items() if v is not None} if args is not None else set()
    given |= _given_values(values, cls, "")
    return frozenset(given)


def _given_values(values: Any, cls: type, dest: str) -> set[str]:
    fields = dataclasses.fields(cls)
    if isinstance(values, cls):
        default = _defaults(cls)
        values = {
            f.name: getattr(values, f.name) for f in fields if getattr(values, f.name) != default[f.name]
        }
    if not isinstance(values, Mapping):
        return set()
    hints, given = typing.get_type_hints(cls), set()
    for f in fields:
        name = f.name if f.name in values else f.metadata.get("renamed_from")
        if name not in values:
            continue
        value = values[name]
        if dataclasses.is_dataclass(hints[f.name]):
            given |= _given_values(value, hints[f.name], f"{dest}{f.name}.")
        elif "flags_from" in f.metadata and isinstance(value, Mapping):
            given |= {f"{dest}{f.name}.{k}" for k in value}
        else:
            given.add(dest + f.name)
    return given


def _defaults(cls: type) -> dict[str, Any]:
    return {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        for f in dataclasses.fields(cls)
    }


def settings_record(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON-ready values (paths as text), as a checkpoint records it."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return str(value) if isinstance(value, os.PathLike) else value

    return plain(dataclasses.asdict(settings))


def settings_to_run(
    settings: T, given: Collection[str] | None, recorded: tuple[Mapping[str, Any], Path] | None
) -> T:
    """The settings a training recipe runs with: with ``resume``, the ones ``recorded`` in the run's newest
    checkpoint (and where), under those the user gave (``given``; None: those that differ from the defaults).
    ``override`` without ``resume`` is an error."""
    if getattr(settings, "override", None) and not getattr(settings, "resume", False):
        raise LmforgeError("--override only applies with --resume", hint="add --resume, or drop --override")
    if not getattr(settings, "resume", False) or recorded is None:
        return settings
    if given is None:
        given = given_settings(None, settings, type(settings))
    return resumed(settings, recorded[0], given, where=str(recorded[1]))


def resumed(settings: T, recorded: Mapping[str, Any], given: Collection[str], *, where: str) -> T:
    """``settings`` as the run recorded them (in ``where``): a given per-process setting and one named by
    ``settings.override`` take effect; any other given setting must equal the record.

    A given setting that differs is one error naming every such flag with both values.
    """
    cls = type(settings)
    flags = _flag_names(cls)
    override = _override_keys(getattr(settings, "override", []), flags)
    mine, theirs = _leaves(settings_record(settings), cls), _leaves(recorded, cls)
    merged, differ = dict(theirs), {}
    for key, value in mine.items():
        if key in override or (key in given and _per_process(cls, key)):
            merged[key] = value
        elif key in given and not _same(value, theirs.get(key)):
            differ[key] = f"{flags.get(key, key)} {value} (the run's: {theirs.get(key)})"
    if differ:
        names = ",".join(dict.fromkeys(flags.get(k, k).lstrip("-") for k in differ))
        raise LmforgeError(
            f"--resume continues the run as recorded in {where}, but these differ: "
            + "; ".join(differ.values()),
            hint=f"add --override {names} to change them, or drop them",
        )
    for key in [k for k in merged if k not in mine and k.partition(".")[0] not in _mapping_fields(cls)]:
        merged.pop(key)  # a setting the record has and this version does not (from an older lmforge)
    return typing.cast(T, settings_from(None, _unflatten(merged), cls, source=where))


def _same(mine: Any, theirs: Any) -> bool:
    """Equal, or two spellings of one path (``shards`` and ``/home/me/shards``)."""
    if mine == theirs:
        return True
    if isinstance(mine, str) and isinstance(theirs, str) and mine and theirs:
        return Path(mine).resolve() == Path(theirs).resolve()
    return False


def _leaves(values: Mapping[str, Any], cls: type, dest: str = "") -> dict[str, Any]:
    """Nested settings -> {dotted name: value}; a mapping field (``model_config``) gives one leaf per key."""
    hints, out = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value, key = values[f.name], dest + f.name
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, Mapping):
            out.update(_leaves(value, hints[f.name], key + "."))
        elif "flags_from" in f.metadata:
            out.update({f"{key}.{k}": v for k, v in (value or {}).items()})
        else:
            out[key] = value
    return out


def _unflatten(leaves: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in leaves.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def _mapping_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if "flags_from" in f.metadata}


def _per_process(cls: type, key: str) -> bool:
    hints = typing.get_type_hints(cls)
    head, _, rest = key.partition(".")
    for f in dataclasses.fields(cls):
        if f.name == head:
            if rest and dataclasses.is_dataclass(hints[f.name]):
                return _per_process(hints[f.name], rest)
            return bool(f.metadata.get("per_process"))
    return False


def _flag_names(cls: type, prefix: str = "", dest: str = "") -> dict[str, str]:
    """{dotted name: the flag as the user types it} (``train.max_steps`` -> ``--max-steps``), as ``add_flags``
    names them; a setting without a flag keeps its dotted name."""
    hints, names = typing.get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        kind, key = hints[f.name], dest + f.name
        if dataclasses.is_dataclass(kind):
            inner = _flag_names(
                kind, prefix + f.metadata.get("flag_prefix", f.name.replace("_", "-") + "-"), key + "."
            )
            names.update(
                {k: v for k, v in inner.items() if k[len(key) + 1 :] not in f.metadata.get("skip_flags", ())}
            )
        elif "flags_from" in f.metadata:
            names.update(
                {f"{key}.{n}": "--" + prefix + n.replace("_", "-") for n in f.metadata["flags_from"][1]}
            )
        elif f.metadata.get("cli", True) is False or f.metadata.get("positional"):
            names[key] = key
        else:
            names[key] = "--" + prefix + f.name.replace("_", "-")
    return names


def _override_keys(override: Collection[str], flags: Mapping[str, str]) -> set[str]:
    """The dotted names ``--override`` means: each entry a flag with or without its dashes (``max-steps``,
    ``--lora-rank``) or a YAML key (``max_steps``, ``train.max_steps``); an entry naming nothing is an error."""
    spelled: dict[str, set[str]] = {}
    for key, flag in flags.items():
        for name in (flag.lstrip("-"), key, key.rpartition(".")[2]):
            spelled.setdefault(name.replace("_", "-"), set()).add(key)
    keys: set[str] = set()
    for entry in override:
        name = entry.strip().lstrip("-").replace("_", "-")
        if name not in spelled:
            near = difflib.get_close_matches(name, [f.lstrip("-") for f in flags.values()], n=1)
            raise LmforgeError(
                f"--override names no setting: {entry}",
                hint=f"did you mean {near[0]}?"
                if near
                else "name flags as you type them, e.g. --override max-steps,lr",
            )
        keys |= spelled[name]
    return keys
