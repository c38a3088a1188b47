"""One option style for every ``slmops`` command, whatever module defines it.

* Olive's underscore names, with the dashed form accepted too: ``--max_steps`` == ``--max-steps``.
* Olive's boolean forms: ``--flag``, ``--flag true`` / ``--flag false`` (also yes/no, 1/0, on/off,
  and ``--flag=false``), next to click's ``--no-flag``.
* All unknown options are reported at once, in one line, with the nearest known names; a command
  may also refuse named options with a reason (``refused``).
* ``--version`` on every subcommand, and defaults shown in every ``--help``.

``adopt(command)`` gives an existing click command (or group, recursively) this behaviour; the
root group adopts every subcommand it loads, so modules need no changes to get it.
"""

from __future__ import annotations

import difflib
from typing import Any

import click

from slmops.errors import SlmopsUsageError

BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "y": True, "n": False,
              "1": True, "0": False, "on": True, "off": False}


def parse_bool(text: str, option: str) -> bool:
    """``true``/``false`` (and yes/no, 1/0, on/off) -> bool; anything else names the option."""
    value = BOOL_WORDS.get(text.strip().lower())
    if value is None:
        raise SlmopsUsageError(option, f"'{text}' is not a boolean; use {option} true or {option} false")
    return value


def _norm(opt: str) -> str:
    """``--max-steps`` / ``--max_steps`` -> ``max_steps`` (the key both spellings share)."""
    return opt.lstrip("-").replace("-", "_")


def _looks_like_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _version_callback(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from slmops import __version__

    click.echo(f"slmops {__version__}")
    ctx.exit(0)


def _version_option() -> click.Option:
    return click.Option(["--version"], is_flag=True, expose_value=False, is_eager=True, callback=_version_callback,
                        help="Show the slmops version and exit.")


class OptionStyle:
    """Mixin for click.Command / click.Group: see the module docstring."""

    #: option name (as the user types it, e.g. ``--enable_search``) -> why it is refused and what to use.
    refused: dict[str, str] = {}

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params: list[click.Parameter] = super().get_params(ctx)  # type: ignore[misc]
        if not any("--version" in getattr(p, "opts", ()) for p in params):
            params = [*params, _version_option()]
        return params

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        extra.setdefault("show_default", True)
        return super().make_context(info_name, args, parent=parent, **extra)  # type: ignore[misc]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = normalize_args(self, ctx, list(args))  # type: ignore[arg-type]
        return super().parse_args(ctx, args)  # type: ignore[misc, no-any-return]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)  # type: ignore[misc]
        return adopt(command) if command is not None else None


def normalize_args(command: click.Command, ctx: click.Context, args: list[str]) -> list[str]:
    """Rewrite dashed/underscored spellings and boolean values to the command's own options, and
    raise one SlmopsUsageError that lists every unknown or refused option."""
    known: dict[str, tuple[click.Option, bool, str]] = {}  # norm key -> (param, is secondary, exact opt)
    shorts: dict[str, click.Option] = {}
    for p in command.get_params(ctx):
        if not isinstance(p, click.Option):
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                known[_norm(opt)] = (p, False, opt)
            else:
                shorts[opt] = p
        for opt in p.secondary_opts:
            known[_norm(opt)] = (p, True, opt)
    is_group = isinstance(command, click.Group)
    # a command with arguments (`generate PROMPT`) takes only true/false after a flag: `--chat yes` keeps "yes" a prompt
    positional = is_group or any(isinstance(p, click.Argument) for p in command.get_params(ctx))
    refused = dict(getattr(command, "refused", {}) or {})
    refused_keys = {_norm(k): k for k in refused}
    out: list[str] = []
    unknown: list[str] = []
    refusals: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            out.extend(args[i:])
            break
        if not token.startswith("-") or token == "-" or _looks_like_number(token):
            if is_group:  # the subcommand and its arguments: the subcommand normalizes them
                out.extend(args[i:])
                break
            out.append(token)
            i += 1
            continue
        name, eq, value = token.partition("=")
        param: click.Option | None
        if name.startswith("--"):
            entry = known.get(_norm(name))
            param, secondary, exact = entry if entry else (None, False, name)
        else:
            param, secondary, exact = shorts.get(name), False, name
        if param is None:
            key = _norm(name)
            explain = getattr(command, "explain_unknown", None)
            reason = refused[refused_keys[key]] if key in refused_keys else (explain(key) if explain else None)
            if reason:
                refusals.append(f"{name}: {reason}")
            else:
                unknown.append(name)
            # an unknown option's value (if it has one) is not an argument of its own
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                i += 1
            i += 1
            continue
        if param.is_flag and not param.count and (getattr(param, "is_bool_flag", False) or isinstance(param.flag_value, bool)):
            flag_value: bool | None = None
            if eq:
                flag_value = parse_bool(value, name)
            elif i + 1 < len(args) and args[i + 1].strip().lower() in (BOOL_WORDS if not positional else ("true", "false")):
                flag_value = BOOL_WORDS[args[i + 1].strip().lower()]
                i += 1
            if flag_value is None:
                out.append(exact)
            else:
                on = flag_value != secondary  # `--no-x false` means x
                if param.secondary_opts:
                    out.append(param.opts[0] if on else param.secondary_opts[0])
                elif on:
                    out.append(param.opts[0])
                # `--flag false` for a plain flag: the flag is off, as if not given
            i += 1
            continue
        if eq:
            out.append(f"{exact}={value}")
            i += 1
            continue
        out.append(exact)
        nargs = 0 if param.is_flag or param.count else max(param.nargs, 1)
        out.extend(args[i + 1:i + 1 + nargs])
        i += 1 + nargs
    if unknown or refusals:
        raise _unknown_error(command, ctx, unknown, refusals, sorted({o for k, (_, _, o) in known.items()}))
    return out


def _unknown_error(command: click.Command, ctx: click.Context, unknown: list[str], refusals: list[str],
                   known: list[str]) -> SlmopsUsageError:
    names = []
    c: click.Context | None = ctx
    while c is not None and c.parent is not None:
        names.append(c.info_name or "")
        c = c.parent
    path = " ".join(["slmops", *reversed(names)])
    parts = []
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(_norm(name), [_norm(k) for k in known], n=1, cutoff=0.75)
            if close:
                hints.append(f"--{close[0]} for {name}" if len(unknown) > 1 else f"--{close[0]}")
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        parts.append(f"unknown option{'s' if len(unknown) > 1 else ''} of `{path}`{hint}; see `{path} --help`")
    if refusals and unknown:
        parts.extend(refusals)
        return SlmopsUsageError(", ".join(unknown), "; ".join(parts))
    if unknown:
        return SlmopsUsageError(", ".join(unknown), parts[0])
    first, _, reason = refusals[0].partition(": ")
    return SlmopsUsageError(first, "; ".join([reason, *refusals[1:]]))


_ADOPTED: dict[type, type] = {}


def _underscored(opt: str) -> str:
    """``--metrics-port`` -> ``--metrics_port`` (olive's style); ``--no-x`` keeps its ``--no-`` prefix."""
    if not opt.startswith("--"):
        return opt
    body = opt[2:]
    if body.startswith("no-"):
        return "--no-" + body[3:].replace("-", "_")
    return "--" + body.replace("-", "_")


def _show_underscores(command: click.Command) -> None:
    """Spell every long option of ``command`` the olive way in --help and completion; the dashed
    spelling still parses (normalize_args maps both)."""
    for param in command.params:
        if isinstance(param, click.Option):
            param.opts = list(dict.fromkeys(_underscored(o) for o in param.opts))
            param.secondary_opts = list(dict.fromkeys(_underscored(o) for o in param.secondary_opts))


def adopt(command: click.Command) -> click.Command:
    """Give ``command`` (and, for a group, the commands it returns) the OptionStyle behaviour."""
    cls = type(command)
    if isinstance(command, OptionStyle):
        return command
    _show_underscores(command)
    if cls not in _ADOPTED:
        _ADOPTED[cls] = type(f"Slmops{cls.__name__}", (OptionStyle, cls), {})
    command.__class__ = _ADOPTED[cls]
    return command


class SlmopsCommand(OptionStyle, click.Command):
    """A click command with slmops' option style (for new commands; ``adopt`` for existing ones)."""


def log_level_option(func: Any) -> Any:
    """Olive's ``--log_level`` (0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 CRITICAL)."""
    return click.option("--log_level", type=click.IntRange(0, 4), default=None, help="olive's logging level: 0 DEBUG, 1 INFO, 2 WARNING, 3 ERROR, 4 CRITICAL  [default: 3]")(func)


def apply_log_level(level: int | None) -> None:
    """Map olive's ``--log_level`` onto Python logging and the HF libraries' verbosity."""
    if level is None:
        return
    import logging
    import os

    py_level = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL][level]
    name = logging.getLevelName(py_level).lower()
    logging.basicConfig(level=py_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(py_level)
    for env in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        os.environ[env] = name
    logging.getLogger("slmops").setLevel(py_level)
    logging.getLogger("slmops").info("log level %s (olive --log_level %d)", name.upper(), level)


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]}?)" if close else ""
