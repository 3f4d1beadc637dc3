"""The command lines' error handling and help, in one place: a `UserError` prints one line, `error: ...`,
and exits with status 2 (a traceback is for bugs; --verbose or JAMBA_JAX_VERBOSE=1 shows it for user
errors too); a config file or `--config.field` that cannot be used is described in one line (ml_collections
raises bare tracebacks for them); `--help` describes the program and lists the config's fields.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import os
import sys

from common.errors import UserError

VERBOSE_ENV = "JAMBA_JAX_VERBOSE"
EXIT_USER_ERROR = 2


class ConfigArgumentError(UserError):
    """--config or a --config.field override that cannot be used."""


def verbose_requested(argv=None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def fail(message: str) -> None:
    """Prints `error: message` (one line) to stderr and exits with status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def user_errors(verbose: bool = False):
    """Turns a UserError raised inside into `error: ...` and exit status 2 (unless verbose)."""
    try:
        yield
    except UserError as e:
        if verbose:
            raise
        fail(str(e))


def config_argument(argv) -> tuple[int | None, str | None]:
    """(index in argv, value) of the --config argument, or (None, None)."""
    for i, a in enumerate(argv[1:], 1):
        if a.startswith("--config="):
            return i, a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return i + 1, argv[i + 1]
    return None, None


def with_config_path(argv, resolve) -> list[str]:
    """argv with its --config value replaced by `resolve(value)` (e.g. a bundled config's path)."""
    i, value = config_argument(argv)
    if i is None:
        return list(argv)
    argv = list(argv)
    argv[i] = f"--config={resolve(value)}" if argv[i].startswith("--config=") else resolve(value)
    return argv


def command_line_fields(argv) -> tuple[str, ...]:
    """The dotted config fields that --config.<field>=value arguments set ("model.hidden_size", ...)."""
    return tuple(a[len("--config."):].split("=", 1)[0] for a in argv[1:] if a.startswith("--config."))


def load_config_file(path: str):
    """The ConfigDict of a config file's get_config()."""
    spec = importlib.util.spec_from_file_location("_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def config_fields(config, prefix="") -> list[tuple[str, object]]:
    """[(dotted name, value)] of every field, nested ones included, in the config's order."""
    out = []
    for k, v in config.items():
        if hasattr(v, "items"):
            out += config_fields(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def describe_config_error(error: Exception, argv, path: str) -> str:
    """One line saying what is wrong with --config / --config.* for the config file at `path`."""
    if not os.path.exists(path):
        return f"config file {path} does not exist (--config expects a Python file with get_config())"
    try:
        fields = [name for name, _ in config_fields(load_config_file(path))]
        fields += sorted({name.rsplit(".", 1)[0] for name in fields if "." in name})  # the groups too
    except Exception as e:  # the user's own config file is broken
        return f"config file {path} cannot be loaded: {type(e).__name__}: {e}"
    unknown = []
    for a in argv[1:]:
        if a.startswith("--config."):
            name = a[len("--config."):].split("=", 1)[0]
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=3, cutoff=0.5)
                unknown.append(f"--config.{name}: {path} has no field {name!r}"
                               + (f"; closest: {', '.join(close)}" if close else ""))
    if unknown:
        return "; ".join(unknown)
    return f"--config {path}: {type(error).__name__}: {' '.join(str(error).split())}"


def help_text(description: str, path: str, usage: str) -> str:
    """The program's description, its usage, and the fields of the config at `path` with their values."""
    lines = [description.strip(), "", f"usage: {usage}", "", f"config fields of {path} (override any with "
             "--config.<field>=<value>):"]
    try:
        fields = config_fields(load_config_file(path))
    except Exception as e:  # help still helps when the default config cannot load
        return "\n".join(lines + [f"  (cannot load it: {type(e).__name__}: {e})"])
    width = max(len(name) for name, _ in fields)
    lines += [f"  --config.{name:<{width}} = {value!r}" for name, value in fields]
    return "\n".join(lines)
