"""Read a profile file into a resolved `Profile`, or explain exactly what is wrong.

Takes YAML text (YAML 1.2: `no` stays a string, duplicate keys are errors); gives a
`Profile`, or raises `ProfileError` whose issues carry file, line, column and field path.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from sovereign.profile.defaults import KINDS, for_kind, merge
from sovereign.profile.model import Profile
from sovereign.profile.rules import Loc

Position = tuple[int, int]


@dataclass(frozen=True)
class ProfileIssue:
    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.path}: {self.message}"


class ProfileError(Exception):
    def __init__(self, issues: list[ProfileIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues


@dataclass
class _Document:
    """Plain data plus where each value and each mapping key sits in the file (0-based)."""

    data: Any
    values: dict[Loc, Position]
    keys: dict[Loc, Position]


def load_profile(path: Path) -> Profile:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        issue = ProfileIssue(str(path), 1, 1, "<file>", f"cannot read: {reason}")
        raise ProfileError([issue]) from None
    return parse_profile(text, str(path))


def locate(path: Path, loc: Loc, message: str) -> ProfileError:
    """An error about a valid profile's field `loc`, found later (a file it names is
    missing, a digest it pins does not match), pointing at the field's line."""
    document = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
    return ProfileError([_located(str(path), document, {}, "", loc, message, on_key=False)])


def parse_profile(text: str, filename: str) -> Profile:
    return _validate(_parse_yaml(text, filename), filename)


def parse_embedded_profile(text: str, filename: str, at: Loc) -> Profile:
    """The profile held at `at` inside a larger YAML file (a Pulumi stack's config);
    issues point at lines of that file and name fields relative to the profile."""
    return _validate(_embedded_document(text, filename, at), filename)


def locate_embedded(
    text: str, filename: str, at: Loc, found: list[tuple[Loc, str]]
) -> ProfileError:
    """Errors about fields of a valid embedded profile, found later, at their lines."""
    document = _embedded_document(text, filename, at)
    return ProfileError(
        [_located(filename, document, {}, "", loc, message, on_key=False) for loc, message in found]
    )


def _embedded_document(text: str, filename: str, at: Loc) -> _Document:
    document = _parse_yaml(text, filename)
    if not _exists(document.data, at):
        raise ProfileError([_issue(filename, (0, 0), at, "missing: no profile here")])
    data = document.data
    for part in at:
        data = data[part]
    depth = len(at)
    return _Document(
        data=data,
        values={loc[depth:]: pos for loc, pos in document.values.items() if loc[:depth] == at},
        keys={loc[depth:]: pos for loc, pos in document.keys.items() if loc[:depth] == at},
    )


def _validate(document: _Document, filename: str) -> Profile:
    data = document.data
    if data is None:
        raise ProfileError(
            [_issue(filename, (0, 0), (), "the profile is empty; expected a mapping with a kind")]
        )
    if not isinstance(data, dict):
        raise ProfileError(
            [_issue(filename, (0, 0), (), "expected a mapping at the top of the profile")]
        )
    if data.get("kind") not in KINDS:
        expected = f"expected one of {', '.join(KINDS)}"
        if "kind" not in data:
            message = f"missing required field 'kind'; {expected}"
            raise ProfileError([_issue(filename, (0, 0), ("kind",), message)])
        got = data["kind"]
        raise ProfileError(
            [_issue(filename, document.values[("kind",)], ("kind",), f"{expected}; got {got!r}")]
        )
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        issues = _issues(exc, document, filename, data["kind"])
        raise ProfileError(sorted(issues, key=lambda i: (i.line, i.column))) from None


def _parse_yaml(text: str, filename: str) -> _Document:
    yaml = YAML(typ="rt")
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = (mark.line, mark.column) if mark is not None else (0, 0)
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        raise ProfileError(
            [_issue(filename, position, None, f"YAML syntax error: {problem}")]
        ) from None
    except YAMLError as exc:
        raise ProfileError([_issue(filename, (0, 0), None, f"YAML error: {exc}")]) from None
    document = _Document(data=None, values={(): (0, 0)}, keys={})
    document.data = _plain(tree, (), document)
    return document


def _plain(node: Any, loc: Loc, document: _Document) -> Any:
    if isinstance(node, CommentedMap):
        result: dict[Any, Any] = {}
        for key in node:
            child = (*loc, key)
            document.keys[child] = tuple(node.lc.key(key))
            document.values[child] = tuple(node.lc.value(key))
            result[key] = _plain(node[key], child, document)
        return result
    if isinstance(node, CommentedSeq):
        items = []
        for index, item in enumerate(node):
            document.values[(*loc, index)] = tuple(node.lc.item(index))
            items.append(_plain(item, (*loc, index), document))
        return items
    # ruamel keeps scalars as subclasses (ScalarInt, ScalarFloat, ...); strict validation
    # wants the builtins, and bool must be tested before int.
    for builtin in (bool, int, float, str):
        if isinstance(node, builtin):
            return builtin(node)
    return node


def format_loc(loc: Loc | None) -> str:
    if loc is None:
        return "<yaml>"
    if not loc:
        return "<profile>"
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _issue(filename: str, position: Position, loc: Loc | None, message: str) -> ProfileIssue:
    return ProfileIssue(filename, position[0] + 1, position[1] + 1, format_loc(loc), message)


def _issues(
    exc: ValidationError, document: _Document, filename: str, kind: str
) -> list[ProfileIssue]:
    resolved = merge(for_kind(kind), document.data)
    issues: list[ProfileIssue] = []
    for error in exc.errors(include_url=False):
        if error["type"] == "profile_rule":
            for violation in error.get("ctx", {})["violations"]:
                loc = (*error["loc"], *violation.loc)
                issues.append(
                    _located(filename, document, resolved, kind, loc, violation.message, False)
                )
            continue
        loc = tuple(error["loc"])
        on_key = error["type"] == "extra_forbidden"
        issues.append(
            _located(filename, document, resolved, kind, loc, _describe(error, loc), on_key)
        )
    return issues


def _located(
    filename: str,
    document: _Document,
    resolved: dict[str, Any],
    kind: str,
    loc: Loc,
    message: str,
    on_key: bool,
) -> ProfileIssue:
    table = document.keys if on_key else document.values
    if loc in table:
        return _issue(filename, table[loc], loc, message)
    # The value is missing from the file or came from the kind's defaults: point at the
    # nearest enclosing value the user wrote.
    for end in range(len(loc) - 1, -1, -1):
        parent = loc[:end]
        if parent in document.values:
            if _exists(resolved, loc):
                message += f" (the value comes from the {kind} defaults)"
            # A mapping's key line reads better than the line its first child starts on.
            position = document.keys.get(parent, document.values[parent])
            return _issue(filename, position, loc, message)
    return _issue(filename, (0, 0), loc, message)


def _exists(data: Any, loc: Loc) -> bool:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _describe(error: ErrorDetails, loc: Loc) -> str:
    kind = error["type"]
    message = error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        fields = _fields_at(loc[:-1])
        expected = f"; expected one of: {', '.join(fields)}" if fields else ""
        return f"unknown field {loc[-1]!r}{expected}"
    if kind == "missing":
        return f"missing required field {loc[-1]!r}"
    value = error.get("input")
    if isinstance(value, Mapping | list):
        return f"{message}; got a {'mapping' if isinstance(value, Mapping) else 'list'}"
    if kind.endswith("_type") or kind in ("literal_error", "string_pattern_mismatch"):
        return f"{message}; got {type(value).__name__} {value!r}"
    if kind == "value_error":
        return message
    return f"{message}; got {value!r}"


def _fields_at(loc: Loc) -> list[str]:
    """Field names of the model that sits at `loc`, to say what an unknown key could be."""
    annotation: Any = Profile
    for part in loc:
        model = _model_in(annotation)
        if isinstance(part, str) and model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return []
    model = _model_in(annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
