"""Manual pages policyd(8), policyctl(8) and policyd.toml(5) as troff, generated from the
argparse parsers and the configuration schema so that they cannot drift from the code.

Each option's text is its argparse ``help``; each key's is the ``doc`` in its config field's
metadata (``convert.opt``). Only what belongs to no single option or key (section intros,
files, environment) is written here. ``python -m policyd.manpages OUTDIR`` (``make man``)
writes the three files; ``tests/unit/test_manpages.py`` checks that the committed ``man/``
is what this writes and that every option and key has a text. Reads argparse's parser
structure (``_actions``, ``_choices_actions``): no public API lists sub-commands; the
canary in ``tests/unit/test_internals.py`` names them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from . import __version__
from .config import SECTIONS, RateRule, convert
from .config import files as configfile
from .ctl.main import EXIT_STATUS as CTL_EXIT_STATUS
from .ctl.main import build_parser as ctl_parser
from .daemon import EXIT_STATUS as DAEMON_EXIT_STATUS
from .daemon import build_parser as daemon_parser

#: Units for showing a default duration, largest first (the config accepts all of them).
_UNITS: Final = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
_DURATIONS: Final = (convert.duration, convert.positive_duration)
SEE_ALSO: Final = "exim4(8), systemd.exec(5)"
#: What each [section] is for; the keys describe themselves.
SECTION_INTROS: Final = {
    "server": "The listener Exim asks on, and the limits that protect it.",
    "store": "Where state lives: an embedded SQLite file (the default) or Redis, shared by "
    "several MX hosts.",
    "greylist": "Greylisting at RCPT, keyed on (client network, normalised sender, recipient).",
    "ratelimit": "Flood protection: exact rate limits (GCRA) per key; a question is admitted "
    "only when every enforced rule admits it.",
    "ratelimit.rule": "One rate-limit rule; any number of [[ratelimit.rule]] tables.",
    "spf": "SPF checks (RFC 7208) with asynchronous, cached DNS. Off by default.",
    "metrics": "The Prometheus exporter.",
    "admin": "The policyctl socket.",
}


def text(value: str) -> str:
    """Running text for troff: backslashes and hyphens escaped, no line starting a request."""
    escaped = value.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in escaped.split("\n")
    )


def header(name: str, section: int, summary: str) -> list[str]:
    manual = "System Administration" if section == 8 else "File Formats"
    return [
        f'.TH {text(name.upper())} {section} "" "policyd {__version__}" "{manual}"',
        ".nh",  # no hyphenation: names, paths and URLs are copied from here
        ".ad l",
        ".SH NAME",
        f"{text(name)} \\- {text(summary)}",
    ]


def paragraph(body: str) -> list[str]:
    return [".PP", text(body)]


def item(tag: str, body: str) -> list[str]:
    return [".TP", tag, text(body)]


# --- command lines --------------------------------------------------------------------------


def option_tag(action: argparse.Action, *, first_name_only: bool = False) -> str:
    """``\\fB\\-\\-config\\fR, \\fB\\-c\\fR \\fIFILE\\fR`` or ``\\fIKIND\\fR``."""
    metavar = action.metavar or (action.dest.upper() if action.nargs != 0 else None)
    if not action.option_strings:
        return f"\\fI{text(str(metavar))}\\fR"
    shown = action.option_strings[:1] if first_name_only else action.option_strings
    names = ", ".join(f"\\fB{text(o)}\\fR" for o in shown)
    return f"{names} \\fI{text(str(metavar))}\\fR" if metavar else names


def options(parser: argparse.ArgumentParser, skip: set[str]) -> Iterator[argparse.Action]:
    """The parser's own arguments: no help action, no sub-command list, none in ``skip``."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.dest not in skip:
            yield action


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, Any]]:
    """(name, help, sub-parser) of each sub-command, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps[name], sub


def leaves(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """Every command that runs something ("whitelist add"), depth first."""
    for name, help_text, sub in subcommands(parser):
        full = f"{path} {name}".strip()
        if any(True for _ in subcommands(sub)):
            yield from leaves(sub, full)
        else:
            yield full, help_text, sub


def usage(parser: argparse.ArgumentParser, skip: set[str]) -> str:
    parts = []
    for action in options(parser, skip):
        tag = option_tag(action, first_name_only=True)
        parts.append(tag if action.required or not action.option_strings else f"[{tag}]")
    return " ".join(parts)


def described(actions: Iterator[argparse.Action]) -> list[str]:
    """One tagged paragraph per option: its names and metavar, then its help."""
    return [line for action in actions for line in item(option_tag(action), action.help or "")]


def exit_status(statuses: tuple[tuple[int, str], ...]) -> list[str]:
    lines = [".SH EXIT STATUS"]
    for code, meaning in statuses:
        lines += item(f"\\fB{code}\\fR", meaning)
    return lines


def environment_and_files() -> list[str]:
    return [
        ".SH ENVIRONMENT",
        *item(
            f"\\fB{configfile.ENV_VAR}\\fR",
            "the configuration file to read when --config is not given",
        ),
        ".SH FILES",
        *item(
            f"\\fI{text(str(configfile.SYSTEM_CONFIG))}\\fR",
            "the installed configuration, read when neither --config nor "
            f"{configfile.ENV_VAR} names one; without it, the built-in defaults apply "
            "(sockets and state under var/ in the working directory)",
        ),
    ]


def finish(lines: list[str], statuses: tuple[tuple[int, str], ...], see_also: str) -> str:
    """The sections every command's page ends with."""
    lines = [*lines, *exit_status(statuses), *environment_and_files()]
    lines += [".SH SEE ALSO", text(f"{see_also}, {SEE_ALSO}")]
    return "\n".join(lines) + "\n"


def policyd_page() -> str:
    parser = daemon_parser()
    lines = header("policyd", 8, "policy daemon for Exim: greylisting, rate limits, SPF")
    lines += [".SH SYNOPSIS", f"\\fBpolicyd\\fR {usage(parser, set())}", ".SH DESCRIPTION"]
    lines += paragraph(parser.description or "")
    lines += paragraph(
        "SIGTERM or SIGINT: stop accepting, let open questions finish ([server] "
        "drain_timeout), exit 0; a second signal cuts the drain short. SIGHUP: read the "
        "configuration again; an invalid file is refused and the running one kept. Logs go "
        "to stderr (the journal under systemd) unless [server] log_target says syslog."
    )
    lines += [".SH OPTIONS", *described(options(parser, set()))]
    return finish(lines, DAEMON_EXIT_STATUS, "policyctl(8), policyd.toml(5)")


def policyctl_page() -> str:
    parser = ctl_parser()
    globals_ = {a.dest for a in options(parser, set())} - {"version"}
    lines = header("policyctl", 8, "administer a running policyd")
    lines += [
        ".SH SYNOPSIS",
        f"\\fBpolicyctl\\fR {usage(parser, {'version'})} \\fICOMMAND\\fR ...",
        ".SH DESCRIPTION",
    ]
    lines += paragraph(parser.description or "")
    lines += paragraph(
        "Global options may also follow the command. Without --socket or --config, the "
        "admin socket is the [admin] socket of the configuration file policyd itself reads "
        "(see FILES), so on an installed system no option is needed."
    )
    lines += [".SH OPTIONS", *described(options(parser, set()))]
    lines += [".SH COMMANDS"]
    for name, help_text, sub in leaves(parser):
        lines += [
            ".TP",
            f"\\fB{text(name)}\\fR {usage(sub, globals_)}".rstrip(),
            text(help_text),
        ]
        arguments = described(options(sub, globals_))
        lines += [".RS", *arguments, ".RE"] if arguments else []
    return finish(lines, CTL_EXIT_STATUS, "policyd(8), policyd.toml(5)")


# --- the configuration ----------------------------------------------------------------------


def toml_default(field: dataclasses.Field[Any]) -> str:
    """A field's default as it would be written in the file."""
    value: Any = field.default  # every config field has a plain default (convert.opt)
    conv = field.metadata["conv"]
    if field.name == "name" and value == "":
        return "(required)"
    if conv is convert.file_mode:
        return f'"{value:04o}"'
    if conv in _DURATIONS:
        return json.dumps(duration_text(value))
    if conv is convert.rate:
        count, period = value
        return json.dumps(f"{count}/{duration_text(period)}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return json.dumps([str(v) for v in value])
    return json.dumps(value)


def duration_text(seconds: float) -> str:
    for unit, size in _UNITS:
        count = seconds / size
        if seconds and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{seconds:g}s"


def key_items(cls: type[Any]) -> list[str]:
    lines = []
    for field in dataclasses.fields(cls):
        tag = f"\\fB{text(field.name)}\\fR = {text(toml_default(field))}"
        lines += item(tag, field.metadata["doc"])
    return lines


def config_page() -> str:
    lines = header("policyd.toml", 5, "configuration of policyd")
    lines += [".SH SYNOPSIS", text(str(configfile.SYSTEM_CONFIG)), ".SH DESCRIPTION"]
    lines += paragraph(
        "TOML, read once at start and again on SIGHUP, and validated into typed settings: an "
        "unknown section or key, a wrong type or an impossible value is an error that names "
        "the key (policyd --check-config). Durations are seconds (90, 1.5) or strings with a "
        'unit: "500ms", "90s", "5m", "2h", "2d", "1w". Every key is optional; the value shown '
        "is the default. SIGHUP applies [greylist], [ratelimit], [spf] and the log level at "
        "once; [server], [store], [metrics] and [admin] changes need a restart."
    )
    for name, cls in SECTIONS.items():
        lines += [f'.SH "[{name}]"', text(SECTION_INTROS[name])]
        lines += key_items(cls)
        if name == "ratelimit":
            lines += [".SS [[ratelimit.rule]]", text(SECTION_INTROS["ratelimit.rule"])]
            lines += key_items(RateRule)
    lines += [".SH SEE ALSO", text(f"policyd(8), policyctl(8), {SEE_ALSO}")]
    return "\n".join(lines) + "\n"


#: File name → generator.
PAGES: Final = {
    "policyd.8": policyd_page,
    "policyctl.8": policyctl_page,
    "policyd.toml.5": config_page,
}


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, page in PAGES.items():
        path = directory / name
        path.write_text(page(), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m policyd.manpages OUTDIR", file=sys.stderr)
        return 2
    for path in write(Path(args[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
