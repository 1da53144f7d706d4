"""Bad command lines and config files, reported in one line naming the flag or file.

``check_config_files`` reads every ``--config``/``-c`` YAML before the parser does, so a missing file or a syntax
error names the file, the line and the column (jsonargparse reports "<unicode string>"). ``one_line`` rewrites a
jsonargparse error message into one line: for a union ("Does not validate against any of the Union subtypes ...")
it keeps the reason of the subtype the value was meant for, drops the ``NoneType`` alternative and the echo of the
given value, and joins nested parser keys into the full flag (``--model.lr_schedule.warmup_fraction``).
"""

from __future__ import annotations

import re
from pathlib import Path

_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "Expected a <class 'NoneType'>",
    "Problem with given class_path",
    "Parser key",
)
_EXPECTED_PATH = re.compile(r"Expected a path but (.*) either not accessible or invalid")


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif a.startswith("--config="):
            paths.append(a.split("=", 1)[1])
    return paths


def check_config_files(argv: list[str]) -> None:
    """Every ``--config`` file exists and is valid YAML (a mapping), else ``ValueError`` naming the file."""
    import yaml

    for name in _config_paths(argv):
        p = Path(name)
        if not p.is_file():
            what = "is a folder" if p.is_dir() else "does not exist"
            raise FileNotFoundError(f"--config {name!r} {what}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"--config {name!r}: not a UTF-8 text file (byte {e.start})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"--config {name!r}: not valid YAML at{where}: {problem}") from None
        if data is not None and not isinstance(data, dict):
            raise ValueError(
                f"--config {name!r}: expected a mapping of keys (model:, data:, trainer:, ...), "
                f"got a {type(data).__name__}"
            )


def _short_type(text: str) -> str:
    """ "<class 'float'>" -> "float"; "typing.Literal['a', 'b']" -> "one of 'a', 'b'"."""
    text = text.strip().removeprefix("a ").removeprefix("an ")
    m = re.fullmatch(r"<class '([\w.]+)'>", text.strip())
    if m:
        return "a " + m.group(1).rsplit(".", 1)[-1]
    m = re.fullmatch(r"typing\.Literal\[(.*)\]", text.strip())
    if m:
        return "one of " + m.group(1)
    return text.strip()


def _subclass_names(subtypes_line: str) -> list[str]:
    """Concrete subclasses of the union's class type, for "choose one of" hints (empty when unknown)."""
    import importlib
    import inspect

    m = re.search(r"<class '([\w.]+)'>", subtypes_line)
    if not m or m.group(1) == "NoneType":
        return []
    module, _, name = m.group(1).rpartition(".")
    try:
        base = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return []
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            found.append(cls.__name__)
    return sorted(set(found))


def _reasons(lines: list[str]) -> list[str]:
    """The lines of a jsonargparse message that say what is wrong (not the union's bookkeeping)."""
    reasons = []
    for s in lines:
        s = s.strip().removeprefix("- ").strip()
        if not s or any(s.startswith(n) for n in _NOISE) or _EXPECTED_PATH.match(s):
            continue
        reasons.append(s)
    return reasons


def _subclass_names_of_key(command: str, key: str) -> list[str]:
    """Concrete subclasses of the class type annotated for ``key`` (``model.processor``) in ``command``'s model."""
    import typing

    roots = {
        "predict": "pd_lightning.predict.TeacherLogits",
        "fit": "pd_lightning.module.DistillationModule",
        "validate": "pd_lightning.module.DistillationModule",
        "test": "pd_lightning.module.DistillationModule",
    }
    parts = key.split(".")
    if command not in roots or len(parts) != 2 or parts[0] != "model":
        return []
    import importlib

    module, _, name = roots[command].rpartition(".")
    try:
        hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    except Exception:  # noqa: BLE001 - only a hint for the message
        return []
    hint = hints.get(parts[1])
    for t in typing.get_args(hint) or (hint,):
        if isinstance(t, type) and t is not type(None):
            return _subclass_names(f"<class '{t.__module__}.{t.__qualname__}'>")
    return []


def one_line(message: str, command: str = "", positional: bool = False) -> str:
    """A jsonargparse error message as one line: ``--flag: reason``.

    Args:
        message: jsonargparse's (multi-line) message.
        command: the pd-lightning command, for "see pd-lightning COMMAND --help" and class-name hints.
        positional: the command's required arguments are positional (a plain function's CLI), so a missing one is
            named ``PATH`` rather than ``--path``.
    """
    message = str(message)
    lines = [s.rstrip() for s in message.splitlines()]
    help_hint = f" (see pd-lightning {command} --help)" if command else ""
    link = re.match(r"argument ([\w.]+) --> ([\w.]+): ", message)
    if link:
        source, target = link.groups()
        return f"--{target} is set from --{source} (the data's own value): remove --{target} from the command line"
    if message.startswith("Problems parsing config"):
        return "a --config file is not valid YAML: " + " ".join(s.strip() for s in lines if s.strip())[:300]
    required = re.match(r"the following arguments are required: (.*)", message)
    if required:
        names = [
            n.strip().split(".", 1)[-1] if command and n.strip().startswith(command + ".") else n.strip()
            for n in required.group(1).split(",")
        ]
        shown = [n.upper() if positional and "." not in n else "--" + n for n in names]
        return f"missing required {', '.join(shown)}{help_hint}"
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys and "Does not validate against any of the Union subtypes" in message:
        reasons = [r for r in _reasons(lines) if not r.startswith("Expected a dot import path")]
        if reasons:  # raised while instantiating a class: its own message names the flag
            return reasons[0]
    if not keys:
        text = " ".join(s.strip() for s in lines if s.strip())
        return text + (help_hint if text.startswith("unrecognized") or "required" in text else "")
    flag = "--" + ".".join(keys)
    subtypes = next((s for s in lines if s.strip().startswith("Subtypes:")), "")
    class_path = re.search(r"Problem with given class_path '([\w.]+)'", message)
    reasons = _reasons(lines)
    if not reasons:
        return f"{flag}: invalid value{help_hint}"
    literals = [
        _short_type(r.removeprefix("Expected a ")) for r in reasons if r.startswith("Expected a typing.Literal")
    ]
    if literals and len(literals) == len(reasons):
        choices = ", ".join(c.removeprefix("one of ") for c in literals)
        given = re.search(r"Given value: (.*)", message)
        got = f", got {given.group(1).strip()!r}" if given else ""
        return f"{flag}: expected one of {choices}{got}"
    reason = reasons[0]
    m = re.match(r"Expected a dot import path string: (.*)", reason)
    if m:
        names = _subclass_names(subtypes) or _subclass_names_of_key(command, ".".join(keys))
        hint = f"; choose one of {', '.join(names)}" if names else "; give a class name or its full import path"
        return f"{flag}: {m.group(1)!r} is not a known class{hint}"
    m = re.match(r"Expected an instantiatable class, but ([\w.]+) is abstract", reason)
    if m:
        names = _subclass_names(subtypes)
        example = f" (one of {', '.join(names)})" if names else ""
        plain = [n for n in names if n.startswith(("Static", "Constant"))]  # the plain choice makes the best example
        first = (plain or names or ["NAME"])[0]
        return f"{flag}: choose a class first, e.g. {flag} {first}{example}, then set its arguments"
    m = re.match(r"Expected (.+?)\. Got value: (.*)", reason)
    if m:
        return f"{flag}: expected {_short_type(m.group(1))}, got {m.group(2)!r}"
    m = re.match(r"Expected a <class '(int|float|bool|str)'>", reason)
    if m:
        kind = {"int": "a whole number", "float": "a number (e.g. 100e9)", "bool": "true or false", "str": "text"}
        given = re.search(r"Given value: (.*)", message)
        return f"{flag}: expected {kind[m.group(1)]}" + (f", got {given.group(1).strip()!r}" if given else "")
    m = re.match(r"Option '(\w+)' is not accepted", reason)
    if m:
        cls = class_path.group(1).rsplit(".", 1)[-1] if class_path else "this class"
        return f"{flag}: {cls} has no argument {m.group(1)!r}{help_hint}"
    m = re.match(r"File does not exist: (.*)", reason)
    if m:
        return f"{flag}: file {m.group(1)} does not exist"
    return f"{flag}: {reason}"
