"""The manual pages: generated from the parsers and the config schema, committed as
generated, complete (every option and key has a text), and rendered by man(1) without
warnings."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import config as cfg
from policyd import manpages
from policyd.config.convert import integer, opt
from policyd.ctl.main import build_parser as ctl_parser
from policyd.daemon import build_parser as daemon_parser

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "man"
#: man-db's and groff's own timeouts are far below this; reaching it means a hang.
RENDER_TIMEOUT = 30.0


def all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for _, _, sub in manpages.subcommands(parser):
        yield from all_parsers(sub)


def test_the_committed_pages_are_what_make_man_writes(tmp_path: Path) -> None:
    written = manpages.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in COMMITTED.iterdir())
    for path in written:
        assert path.read_text() == (COMMITTED / path.name).read_text(), (
            f"man/{path.name} is stale: run `make man` and commit the result"
        )


@pytest.mark.parametrize("build", [daemon_parser, ctl_parser])
def test_every_option_and_command_has_a_description(
    build: type[argparse.ArgumentParser],
) -> None:
    missing = []
    for parser in all_parsers(build()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [
                    f"{parser.prog} {c.dest}" for c in action._choices_actions if not c.help
                ]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {action.option_strings or action.dest}")
    assert missing == []


def test_every_config_key_has_a_description() -> None:
    sections = [*cfg.SECTIONS.values(), cfg.RateRule]
    missing = [
        f"{section.__name__}.{field.name}"
        for section in sections
        for field in dataclasses.fields(section)
        if not field.metadata.get("doc", "").strip()
    ]
    assert missing == []


def test_a_key_without_a_description_is_caught() -> None:
    @dataclasses.dataclass(frozen=True)
    class Section:
        described: int = opt(1, integer, "a text")
        bare: int = opt(2, integer)

    assert [f.name for f in dataclasses.fields(Section) if not f.metadata["doc"]] == ["bare"]


def test_pages_name_what_they_document() -> None:
    toml = manpages.config_page()
    for section, cls in cfg.SECTIONS.items():
        assert f'.SH "[{section}]"' in toml
        for field in dataclasses.fields(cls):
            assert f"\\fB{manpages.text(field.name)}\\fR = " in toml
    assert '\\fBdelay\\fR = "5m"' in toml and '\\fBsocket_mode\\fR = "0660"' in toml
    assert '\\fBrate\\fR = "100/1h"' in toml
    ctl = manpages.policyctl_page()
    assert "\\fBwhitelist add\\fR" in ctl and "\\fB\\-\\-force\\fR" in ctl
    assert "\\fB\\-\\-check\\-config\\fR" in manpages.policyd_page()


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_man_renders_each_page_without_warnings(name: str) -> None:
    path = COMMITTED / name
    assert shutil.which("man") and shutil.which("groff"), (
        "man-db and groff-base are in .ci/run's DEBIAN_PACKAGES"
    )
    env = {**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    shown = subprocess.run(
        ["man", "-l", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=RENDER_TIMEOUT,
        check=False,
    )
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    title = name.rsplit(".", 1)[0].upper()
    assert shown.stdout.startswith(title), shown.stdout[:200]
    assert "SEE ALSO" in shown.stdout
    warned = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
        capture_output=True,
        text=True,
        timeout=RENDER_TIMEOUT,
        check=False,
    )
    assert warned.returncode == 0 and warned.stderr == "", warned.stderr
