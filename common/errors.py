"""User errors: the exception type for mistakes a user can fix, and their one-line messages.

`UserError` carries the fix in its message and an exit code; the `herd` command line prints it as one line,
never a traceback. Each area raises its own subclass (`ClusterFileError`, `JobFileError`, ...), so callers can
catch one area's mistakes. `describe_validation_error` turns a pydantic `ValidationError` into the one line every
area prints: `[source[:line]: ]path: problem`, with the bad value, "did you mean" for an unknown key and the
field's description as the fix.
"""
from __future__ import annotations

import difflib
import re
import typing
from typing import Any

__all__ = [
    "UserError", "ClusterFileError", "JobFileError", "LicensingConfigError", "ServeConfigError", "CheckpointError",
    "closest", "did_you_mean", "field_path", "path_loc", "first_error", "model_at", "describe_validation_error",
    "yaml_key_lines", "line_for",
]


class UserError(Exception):
    """A problem in what the user gave us (a file, a flag, a value), with the fix in the message."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class ClusterFileError(UserError):
    """A mistake in a cluster file; the message is one line: file, YAML path, bad value, fix."""


class JobFileError(UserError, ValueError):
    """A mistake in a fine-tuning job file; the message names the field and the fix."""


class LicensingConfigError(UserError):
    """A mistake in the licensing config (YAML or its values)."""


class ServeConfigError(UserError):
    """A mistake in the Serve application's arguments (`build_app(args)`, a Serve config's `args:`)."""


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that herd cannot (or will not) load; the message says why and what to do."""


# ---- names and paths ---------------------------------------------------------------------------------------

def closest(word: Any, choices: Any) -> str | None:
    """The choice nearest to `word` by spelling, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: Any, choices: Any) -> str:
    """' (did you mean 'x'?)' for the closest choice, else ''."""
    best = closest(word, choices)
    return f" (did you mean {best!r}?)" if best is not None else ""


def field_path(loc: tuple) -> str:
    """pydantic's location as the path a user reads: ('node_groups', 0, 'gpu') -> 'node_groups[0].gpu'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def path_loc(path: str) -> tuple:
    """The inverse of `field_path`: 'node_groups[0].gpu' -> ('node_groups', 0, 'gpu')."""
    return tuple(int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", path))


def _is_branch_tag(part: Any) -> bool:
    """A union branch pydantic puts in a location ('str', 'list[int]', 'function-after[...]'): not a key."""
    if not isinstance(part, str):
        return False
    return part in {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "dict"} \
        or "[" in part and not part.startswith("[") or part.startswith(("function-", "tagged-union"))


def first_error(e) -> tuple[dict, tuple, int]:
    """The error to report first, its location without union-branch tags, and how many others there are.

    A misspelt key shows up twice, as unknown and (the key it meant) as missing: the misspelling comes first.
    """
    errs = sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")
    err = errs[0]
    return err, tuple(p for p in err["loc"] if not _is_branch_tag(p)), len(errs) - 1


def model_at(root: Any, loc: tuple) -> Any:
    """The pydantic model class that holds the last key of `loc` under `root` (to list the keys valid there)."""
    from pydantic import BaseModel

    def is_model(t: Any) -> bool:
        return isinstance(t, type) and issubclass(t, BaseModel)

    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not is_model(model) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = next((a for a in (ann, *typing.get_args(ann)) if is_model(a)), None)
    return model if is_model(model) else None


# ---- the one-line message ----------------------------------------------------------------------------------

def _as_fix(description: str) -> str:
    """A field description read after 'set it to': no final period, a capital dropped unless it starts a name."""
    d = description.rstrip().rstrip(".")
    word = d.split(maxsplit=1)[0] if d else ""
    return d[0].lower() + d[1:] if len(word) > 1 and word[0].isupper() and word[1:].islower() else d


def _description(field: Any) -> str:
    """The field's description, else (a section) the first line of its model's docstring, lower-cased."""
    if field.description:
        return field.description
    section = model_at(field.annotation, ("x",))
    doc = (section.__doc__ or "").strip().splitlines()[0] if section is not None and section.__doc__ else ""
    return _as_fix(doc) if doc else ""


def _shown(value: Any, limit: int = 80) -> str:
    s = repr(value)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def describe_validation_error(e, model: Any, source: str | None = None,
                              lines: dict[tuple, int] | None = None) -> str:
    """The first error of `e` (validating `model`) as herd's one line: `[source[:line]: ]path: problem`.

    - unknown key: `path: unknown key (did you mean 'x'?); valid keys in <parent>: a, b, c`
    - missing key: `path: missing; add it (<the field's description>)`
    - bad value: `path: <value> is not accepted: <pydantic's reason>; set it to <the field's description>`
      (a validator's own message already carries the fix, so no description is added to it)

    Further errors are counted at the end. `lines` (from `yaml_key_lines`) adds the line of the YAML key.
    """
    err, loc, others = first_error(e)
    more = f" ({others} more problem{'s' if others > 1 else ''} after this one)" if others else ""
    path = field_path(loc)
    holder = model_at(model, loc)
    if err["type"] == "extra_forbidden":
        valid = list(holder.model_fields) if holder else []
        where = field_path(loc[:-1]) or "the top level"
        text = f"{path}: unknown key{did_you_mean(loc[-1], valid)}; valid keys in {where}: {', '.join(valid)}"
    elif err["type"] == "missing":
        field = holder.model_fields.get(loc[-1]) if holder else None
        desc = _description(field) if field is not None else ""
        text = f"{path}: missing; add it{f' ({desc})' if desc else ''}"
    else:
        text = _bad_value(err, model, loc, path)
    where = ""
    if source:
        line = line_for(loc, lines) if lines else None
        where = f"{source}:{line}: " if line else f"{source}: "
    return f"{where}{text}{more}"


def _bad_value(err: dict, model: Any, loc: tuple, path: str) -> str:
    key_loc = loc
    while key_loc and isinstance(key_loc[-1], int):  # an item of a list: describe the list's field
        key_loc = key_loc[:-1]
    holder = model_at(model, key_loc) if key_loc else None
    field = holder.model_fields.get(key_loc[-1]) if holder else None
    custom = err["type"] in ("value_error", "assertion_error")  # our validators' messages carry the fix
    hint = f"; set it to {_as_fix(field.description)}" if field is not None and field.description and not custom \
        else ""
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = err.get("input")
    if field is not None and "Secret" in str(field.annotation):  # never echo a key back
        return f"{path}: (value hidden) is not accepted: {msg}{hint}"
    if custom and isinstance(value, dict):  # a model validator: the whole section is the input, not worth showing
        return f"{path}: {msg}" if path else msg
    return f"{path + ': ' if path else ''}{_shown(value)} is not accepted: {msg}{hint}"


# ---- YAML lines --------------------------------------------------------------------------------------------

def yaml_key_lines(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every key and list item in a YAML document, by its path."""
    import yaml

    out: dict[tuple, int] = {}

    def walk(node: Any, loc: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                out[loc + (k.value,)] = k.start_mark.line + 1
                walk(v, loc + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[loc + (i,)] = v.start_mark.line + 1
                walk(v, loc + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return out


def line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    """The line of the deepest part of `loc` the file has (a missing key: its section's line)."""
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None
