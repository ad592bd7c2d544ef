"""A small validator toolkit for API documents: each validator checks one value and returns
it normalised, or raises `DocumentError` naming the field's path and the rule it broke.

Validators compose: `obj({...})` checks an object's properties (refusing unknown ones by
name), `items(v)` every item of a list. Paths read like `properties.mountVolumes.
azureFileShares[1].relativeMountPath`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

Validator = Callable[[Any, str], Any]


class DocumentError(ValueError):
    """A document broke rules: `problems` lists each `(path, rule)`, the field and what is
    wrong with it; `path` and `rule` are the first."""

    def __init__(self, path: str, rule: str, problems: list[tuple[str, str]] | None = None):
        self.problems = problems or [(path, rule)]
        self.path, self.rule = self.problems[0]
        more = len(self.problems) - 1
        also = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"{self.path or 'the document'}: {self.rule}{also}")

    @classmethod
    def of(cls, problems: list[tuple[str, str]]) -> DocumentError:
        return cls(*problems[0], problems)


class DuplicateKey(ValueError):
    """A JSON object that names one key twice (`key`: the key, or with loads its path)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key!r} is given twice in one object")
        self.key = key


class NumberTooLong(ValueError):
    """A JSON integer longer than any field takes (Python would refuse past 4,300 digits)."""

    def __init__(self, digits: int) -> None:
        super().__init__(f"holds a number of {digits} digits: no field takes one of more than "
                         f"{MAX_DIGITS}")  # fmt: skip


MAX_DIGITS = 100


def _whole_number(text: str) -> int:
    """json.loads' parse_int: an integer, if it is of a length any field could take."""
    digits = len(text) - text.startswith("-")
    if digits > MAX_DIGITS:
        raise NumberTooLong(digits)
    return int(text)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: a key given twice is refused (DuplicateKey), rather
    than the last silently replacing the first, which no check of the document would see."""
    made = dict(pairs)
    if len(made) < len(pairs):
        raise DuplicateKey(_first_repeated(pairs))
    return made


def _first_repeated(pairs: list[tuple[str, Any]]) -> str:
    """The first key of `pairs` that an earlier pair has (there is one)."""
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise ValueError("no key is repeated")


def loads(text: str | bytes) -> Any:
    """A JSON document whose objects name each key once; DuplicateKey naming the first
    repeated key by its path in the document (`properties.nodeCount`, `a[2].b`);
    NumberTooLong for an integer of more than MAX_DIGITS digits."""
    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_int=_whole_number)
    except DuplicateKey as exc:  # found bottom-up: its path comes from a second, marking read
        marked = json.loads(text, object_pairs_hook=_Repeated.of, parse_int=_whole_number)
        raise DuplicateKey(_repeated_path(marked, "") or exc.key) from None


class _Repeated(dict):
    """An object of the marking read; `repeated`: the first key it names twice, if any."""

    repeated: str | None = None

    @classmethod
    def of(cls, pairs: list[tuple[str, Any]]) -> _Repeated:
        made = cls(pairs)
        if len(made) < len(pairs):
            made.repeated = _first_repeated(pairs)
        return made


def _repeated_path(value: Any, path: str) -> str | None:
    """The path of the first repeated key in a marked document, depth first, in order."""
    if isinstance(value, _Repeated):
        for key, item in value.items():
            found = _repeated_path(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
        if value.repeated is not None:
            return f"{path}.{value.repeated}" if path else value.repeated
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _repeated_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          int: "a whole number", float: "a fractional number"}  # fmt: skip


def _kind(value: Any) -> str:
    if type(value) is float and not math.isfinite(value):  # 1e400 or Infinity, NaN
        return "a number beyond any limit" if value == value else "NaN"
    return _KINDS.get(type(value), "null" if value is None else type(value).__name__)


def string(*, max_len: int = 4096, pattern: str | None = None, what: str = "",
           empty: bool = False) -> Validator:  # fmt: skip
    """A string (of UTF-8, without NUL), not empty unless `empty` allows it."""
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise DocumentError(path, f"must be a string, not {_kind(value)}")
        if not value and not empty:
            raise DocumentError(path, "must not be empty")
        if len(value) > max_len:
            raise DocumentError(path, f"must be at most {max_len} characters")
        if "\x00" in value:  # no command, path or variable can hold one
            raise DocumentError(path, "must not contain NUL characters")
        if not value.isascii():
            _check_utf8(value, path)
        if compiled and not compiled.fullmatch(value):
            raise DocumentError(path, f"must be {what or 'of the form ' + pattern}")
        return value

    return check


def _check_utf8(value: str, path: str) -> None:
    """Text the log can hold: JSON's `\\ud800` escapes and bytes that are not UTF-8 (which
    the CLI's arguments carry as lone surrogates) encode to no UTF-8 at all."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DocumentError(
            path, f"must be valid UTF-8 text (character {exc.start + 1} is not)"
        ) from None


def integer(low: int | None = None, high: int | None = None) -> Validator:
    """A whole number, also written as one with a fraction of zero (`1.0`, `1e0`: as the
    number it is)."""

    def check(value: Any, path: str) -> int:
        if type(value) is float and value.is_integer():
            value = int(value)
        if type(value) is not int:
            raise DocumentError(path, f"must be a whole number, not {_kind(value)}")
        if low is not None and value < low:
            raise DocumentError(path, f"must be at least {low}")
        if high is not None and value > high:
            raise DocumentError(path, f"must be at most {high}")
        return value

    return check


def boolean(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise DocumentError(path, f"must be true or false, not {_kind(value)}")
    return value


def choice(*values: str) -> Validator:
    """One of `values`, matched without regard to case and returned as spelled here."""
    canonical = {v.lower(): v for v in values}

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value.lower() not in canonical:
            raise DocumentError(path, f"must be one of {', '.join(values)}, not {value!r}")
        return canonical[value.lower()]

    return check


def items(item: Validator, *, max_items: int = 1000) -> Validator:
    def check(value: Any, path: str) -> list:
        if not isinstance(value, list):
            raise DocumentError(path, f"must be a list, not {_kind(value)}")
        if len(value) > max_items:
            raise DocumentError(path, f"must have at most {max_items} items")
        out, problems = [], []
        for i, v in enumerate(value):
            try:
                out.append(item(v, f"{path}[{i}]"))
            except DocumentError as exc:
                problems.extend(exc.problems)
        if problems:
            raise DocumentError.of(problems)
        return out

    return check


def obj(
    fields: Mapping[str, Validator],
    *,
    required: Iterable[str] = (),
    one_of: Iterable[str] = (),
    ignored: Iterable[str] = (),
) -> Validator:
    """An object with these properties; `required` must be present, at most one of `one_of`
    (and at least one, when it is also in `required` as "*"), `ignored` are dropped."""
    required = tuple(required)
    one_of = tuple(one_of)
    ignored = frozenset(ignored)

    def check(value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            raise DocumentError(path, f"must be an object, not {_kind(value)}")
        out: dict[str, Any] = {}
        problems: list[tuple[str, str]] = []  # every broken rule, not just the first
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in ignored:
                continue
            if key not in fields:
                problems.append((where, "is not a known property"))
                continue
            try:
                out[key] = fields[key](item, where)
            except DocumentError as exc:
                problems.extend(exc.problems)
        for key in required:
            if key != "*" and key not in value:
                problems.append((f"{path}.{key}" if path else key, "is required"))
        given = [k for k in one_of if k in value]
        if len(given) > 1:
            problems.append((path, f"give only one of {', '.join(given)}"))
        if "*" in required and one_of and not given:
            problems.append((path, f"needs one of {', '.join(one_of)}"))
        if problems:
            raise DocumentError.of(problems)
        return out

    return check


KEY_VAULT = (
    "is an Azure Key Vault reference, which batchd does not resolve: give the value "
    "itself (batchd stores it encrypted)"
)


def key_vault_reference(value: Any, path: str) -> Any:
    """Batch AI's `*SecretReference` (a Key Vault secret): refused, since batchd has no vault
    to read it from; accepted, the secret would silently be missing when the job runs."""
    raise DocumentError(path, KEY_VAULT)


ENVELOPE_IGNORED = ("$schema", "location", "tags", "id", "name", "type")


def unwrap(document: Any) -> tuple[dict, str]:
    """A resource document's properties and the path prefix to report errors under.

    The properties may come inside Batch AI's `{"properties": ...}` envelope or bare; the
    envelope's `$schema`, `location`, `tags`, `id`, `name` and `type` are ignored, any other
    key beside `properties` is refused.
    """
    if not isinstance(document, dict):
        raise DocumentError("", "must be a JSON object")
    if "properties" not in document:
        return {k: v for k, v in document.items() if k not in ENVELOPE_IGNORED}, ""
    unknown = [k for k in document if k != "properties" and k not in ENVELOPE_IGNORED]
    if unknown:
        raise DocumentError(unknown[0], "is not a known property")
    return document["properties"], "properties"


def resource_id(value: Any, path: str) -> str:
    """A name, a resource id string, or Batch AI's `{"id": "..."}`."""
    if isinstance(value, dict):
        return obj({"id": string()}, required=["id"])(value, path)["id"]
    return string()(value, path)
