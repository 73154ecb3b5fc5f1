"""How one table of the configuration file is read.

A table is a frozen dataclass whose fields are declared with :func:`option`:
the default, a *check* that turns the TOML value into the field's value (or
raises :class:`Invalid` saying why not), whether a reload may apply it, and
whether it is required.  The field's name is the TOML key, so one name
serves from the file to the code.  :func:`parse_table` reads any such class;
a class may add a ``validate(key)`` method for rules that span its fields,
returning a list of problems (one about a key whose value was already
refused is dropped: each key is named once), and a ``complete(key,
problems)`` method that returns the finished object (for values derived
from the file, such as the token read from ``http.token_file``:
:func:`with_token`).

Every problem is a string that starts with the dotted key it is about
(``timeouts.artim``, ``ae[2].title``, ``pipeline.x.command``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable


class ConfigError(ValueError):
    """The configuration is not valid; ``problems`` lists each one."""

    def __init__(self, problems: list[str], source: str = "<string>"):
        self.problems = list(problems)
        self.source = source
        text = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration in {source}:\n{text}")


class Invalid(ValueError):
    """A value that its check refuses; the message follows ``key: ``, or
    ``key[i]: `` for the ``index``-th element of an array."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.where = "" if index is None else f"[{index}]"


@dataclass(frozen=True)
class Option:
    check: Callable[[Any], Any]
    reload: bool = True  # a SIGHUP may apply a new value; else the log says "restart needed"
    required: bool = False


def option(default: Any = MISSING, check: Callable[[Any], Any] = lambda v: v, *, reload: bool = True,
           required: bool = False, **kw):
    """A dataclass field that is a key of its TOML table."""
    meta = {"option": Option(check, reload, required)}
    if default is MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def options(cls):
    """(field name, Option) of a table class, in declaration order."""
    return [(f.name, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def parse_table(cls, table: Any, key: str, problems: list[str]):
    """``cls`` from the TOML ``table`` at ``key``, or None if a required key is
    missing or bad.  Every problem found is added to ``problems``."""
    if not isinstance(table, dict):
        problems.append(f"{key}: expected a table")
        table = {}
    table = dict(table)
    values = {}
    refused = set()  # keys whose value was refused: validate does not name them again
    for name, opt in options(cls):
        if name not in table:
            if opt.required:
                problems.append(f"{key}.{name}: required")
            continue
        try:
            values[name] = opt.check(table.pop(name))
        except Invalid as e:
            problems.append(f"{key}.{name}{e.where}: {e}")
            refused.add(f"{key}.{name}")
    problems.extend(f"{key}.{name}: unknown key" for name in sorted(table))
    if any(opt.required and name not in values for name, opt in options(cls)):
        return None
    obj = cls(**values)
    if hasattr(obj, "validate"):
        problems.extend(p for p in obj.validate(key) if p.partition(":")[0] not in refused)
    if hasattr(obj, "complete"):
        obj = obj.complete(key, problems)
    return obj


def parse_array(cls, value: Any, name: str, problems: list[str], unique: str | None) -> tuple:
    """``[[name]]`` tables, each parsed as ``cls``.  Items with problems are
    kept when they can be made, so that what refers to them is checked too
    (the problems are raised anyway); one whose ``unique`` field (if any)
    repeats an earlier one's is a problem."""
    if not isinstance(value, list):
        problems.append(f"{name}: expected an array of tables [[{name}]]")
        return ()
    out, seen = [], set()
    for i, table in enumerate(value):
        item = parse_table(cls, table, f"{name}[{i}]", problems)
        if unique is not None:
            # A bad item's name still counts, so that a second one is not missed.
            key = getattr(item, unique) if item is not None else _value_of(cls, unique, table)
            if key is not None and key in seen:
                problems.append(f"{name}[{i}].{unique}: {key!r} is configured twice")
            seen.add(key)
        if item is not None:
            out.append(item)
    return tuple(out)


def _value_of(cls, name: str, table):
    """What option ``name`` of ``cls`` makes of its value in ``table``, or None."""
    if not isinstance(table, dict) or name not in table:
        return None
    try:
        return dict(options(cls))[name].check(table[name])
    except Invalid:
        return None


def parse_named(cls, value: Any, name: str, problems: list[str]) -> tuple:
    """``[name.NAME]`` tables: each parsed as ``cls`` with its ``name`` set."""
    if not isinstance(value, dict):
        problems.append(f"{name}: expected tables [{name}.NAME]")
        return ()
    out = []
    for item_name, table in value.items():
        key = f"{name}.{item_name}"
        if not NAME.match(item_name):
            problems.append(f"{key}: the name must be 1..64 letters, digits or _-.")
            continue
        if isinstance(table, dict):
            if "name" in table:  # the table's own name is the one in its header
                problems.append(f"{key}.name: unknown key")
            table = dict(table, name=item_name)
        item = parse_table(cls, table, key, problems)
        if item is not None:
            out.append(item)
    return tuple(out)


def changes(old, new, prefix: str = "") -> list[tuple[str, bool]]:
    """(dotted key, whether a reload may apply it) of every option that
    differs between two objects of one table class; nested tables by their
    own options, arrays of tables as a whole."""
    out = []
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b or not f.compare:
            continue
        key = f"{prefix}{f.name}"
        if "option" in f.metadata:
            out.append((key, f.metadata["option"].reload))
        elif hasattr(a, "__dataclass_fields__"):
            out.extend(changes(a, b, key + "."))
        else:
            out.append((key, True))
    return out


def with_token(table, key: str, problems: list[str], minimum: int = 16):
    """``table`` with its ``token`` read from its ``token_file`` (blocking:
    configuration is read off the reactor thread), stripped; a file that
    cannot be read, or holds less than ``minimum`` characters, is a
    problem of ``key.token_file``."""
    path = table.token_file
    if not path:
        return table
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        problems.append(f"{key}.token_file: cannot read {path!r}: {why}")
        return table
    if len(token) < minimum:
        problems.append(f"{key}.token_file: {path!r} is empty" if minimum <= 1 else
                        f"{key}.token_file: the token in {path!r} is shorter than {minimum} characters")
    return replace(table, token=token)


def reloaded(running, new):
    """Table ``new`` as a reload applies it to ``running``: the options only
    a restart applies keep their running values."""
    return replace(new, **{name: getattr(running, name) for name, opt in options(type(running))
                           if not opt.reload})


# ---- checks: each takes the TOML value and returns the field's value ------

def _typed(value, types, what):
    # bool is an int in Python: never accept it where a number is wanted.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise Invalid(f"expected {what}, got {value!r}")
    return value


def boolean(value):
    return _typed(value, (bool,), "true or false")


def integer(lo: int, hi: int):
    def check(value):
        _typed(value, (int,), f"an integer from {lo} to {hi}")
        if not lo <= value <= hi:
            raise Invalid(f"{value} is out of range {lo}..{hi}")
        return value
    return check


def number(lo: float, hi: float):
    def check(value):
        _typed(value, (int, float), f"a number from {lo} to {hi}")
        if not lo <= value <= hi:
            raise Invalid(f"{value} is out of range {lo}..{hi}")
        return float(value)
    return check


def text(pattern: re.Pattern | None = None, what: str = "a string", *, strip: str | None = None,
         nonempty: bool = False):
    """A string, matching ``pattern`` if given; ``strip`` characters removed."""
    def check(value):
        _typed(value, (str,), what if pattern is not None else "a string")
        if pattern is not None and not pattern.match(value):
            raise Invalid(f"{value!r} is not {what}")
        if strip is not None:
            value = value.strip(strip)
        if nonempty and not value.strip():
            raise Invalid("must not be empty")
        return value
    return check


def one_of(choices: tuple[str, ...]):
    def check(value):
        _typed(value, (str,), "a string")
        if value not in choices:
            raise Invalid(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def strings(pattern: re.Pattern | None = None, what: str = "a string", *, strip: str | None = None):
    """An array of non-empty strings, each matching ``pattern`` if given, as a tuple."""
    def check(value):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise Invalid(f"expected an array of non-empty strings, got {value!r}")
        for i, v in enumerate(value):
            if pattern is not None and not pattern.match(v):
                raise Invalid(f"{v!r} is not {what}", i)
        return tuple(v.strip(strip) if strip is not None else v for v in value)
    return check


# UIDs in configuration: digits and dots, at most 64 characters (PS3.5 9.1).
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def uids(value) -> tuple[str, ...]:
    found = strings(UID, "a UID (digits and dots)")(value)
    if any(len(v) > 64 for v in found):
        raise Invalid("a UID is at most 64 characters")
    return found


def network(value):
    """An IP address or CIDR network."""
    _typed(value, (str,), "a string")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"{value!r} is not an IP address or CIDR network") from None


def endpoint(value):
    """A Twisted server endpoint description, parsed the way the daemon will
    (nothing is bound).  ``systemd:`` ones are checked for form only: the
    inherited sockets exist only under systemd."""
    _typed(value, (str,), "a string")
    if not value:
        return value
    parts = re.split(r"(?<!\\):", value)
    if parts[0] == "systemd":
        args = dict(p.partition("=")[::2] for p in parts[1:])
        if set(args) - {"domain", "index", "name"} or args.get("domain") not in ("INET", "INET6", "UNIX") \
                or ("name" in args) == ("index" in args) \
                or ("index" in args and not args["index"].isdigit()):
            raise Invalid(f"{value!r} is not a valid systemd endpoint "
                          "(systemd:domain=INET|INET6|UNIX:name=NAME, or index=N instead of name)")
        return value
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(object(), value)
    except Exception as e:  # ValueError, TypeError, KeyError, OSError: all say why
        raise Invalid(f"{value!r} is not a valid endpoint description: {e}") from None
    return value


def is_loopback_endpoint(description: str) -> bool:
    """True when a server endpoint description listens on loopback only."""
    # Endpoint descriptions escape ":" as "\\:" (IPv6 addresses).
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    kind = parts[0].strip().lower()
    if kind == "unix":
        return True  # a filesystem socket: its permissions protect it
    if kind not in ("tcp", "tcp6"):
        return False  # systemd:, ssl:, ...: we cannot tell, so assume not
    for part in parts[2:]:
        if part.startswith("interface="):
            try:
                return ipaddress.ip_address(part[len("interface="):]).is_loopback
            except ValueError:
                return False
    return False  # no interface: every address


# Names of our own things ([[destination]] name, [pipeline.NAME]).
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# A dotted Python name (notify.observers).
DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
# PS3.5 Table 6.2-1, AE: default character repertoire, no backslash, no
# control characters: a calling AE title as a peer sends it.
REMOTE_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# We are stricter for AE titles we *serve*, because they name directories:
# letters, digits, space, and "_-." only.
LOCAL_AE = re.compile(r"^[A-Za-z0-9_.\- ]{1,16}$")
# Implementation Version Name is SH: 1..16 characters of the default repertoire.
VERSION_NAME = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
