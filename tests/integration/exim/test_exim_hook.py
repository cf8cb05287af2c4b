"""``policyctl exim enable|disable|status`` on a copy of the machine's ``/etc/exim4``.

The hook runs with ``--root`` pointing at a lab directory holding the copy, so Debian's real
``update-exim4.conf -d COPY -o OUT`` renders it and ``exim4 -C OUT -bV`` checks it; nothing
under the real ``/etc/exim4`` is written (test_debian_package.py does that, once, with the
package). For the single-file layout ``update-exim4.conf -d`` reads the copy's
``exim4.conf.localmacros`` only when the machine's own exists (operator-guide §2.5), so there
the files are checked, and the rendering only where it does not need the macros.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import pytest

from policyd.ctl import exim as exim_hook
from policyd.ctl.main import main

from .conftest import SNIPPETS_DIR, Lab

pytestmark = pytest.mark.exim

DEBIAN_CONFDIR = Path("/etc/exim4")


def tree_digest(path: Path) -> str:
    """Names, modes and contents of every file under ``path``."""
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        digest.update(f"{item.relative_to(path)} {item.lstat().st_mode:o}\n".encode())
        if item.is_file() and not item.is_symlink():
            digest.update(item.read_bytes())
    return digest.hexdigest()


def make_root(lab: Lab, layout: str) -> Path:
    root = lab.subdir(f"hook-{layout}")
    shutil.copytree(DEBIAN_CONFDIR, root / "etc/exim4", symlinks=True)
    debconf = root / "etc/exim4/update-exim4.conf.conf"
    text = re.sub(r"^dc_use_split_config=.*\n", "", debconf.read_text(), flags=re.M)
    debconf.write_text(f"{text}dc_use_split_config='{'true' if layout == 'split' else 'false'}'\n")
    return root


def hook(root: Path, *args: str) -> int:
    return main(["exim", *args, "--root", str(root), "--snippets", str(SNIPPETS_DIR)])


@pytest.fixture
def split_root(lab: Lab) -> Path:
    return make_root(lab, "split")


@pytest.fixture
def single_root(lab: Lab) -> Path:
    return make_root(lab, "single")


def test_split_layout_enable_renders_the_hooks_and_disable_undoes_it(
    split_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian = exim_hook.Debian(split_root)
    before = tree_digest(split_root / "etc/exim4")
    assert hook(split_root, "status") == 1

    assert hook(split_root, "enable") == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "update-exim4.conf and exim4 -bV passed" in out
    assert (debian.macros_file).read_text().count(f"{debian.acl_dir}/policyd_") == 2
    for source, name in exim_hook.ACL_FRAGMENTS.items():
        assert (debian.acl_dir / name).read_text() == (SNIPPETS_DIR / source).read_text()
    rendered = debian.rendered.read_text()
    assert f"CHECK_RCPT_LOCAL_ACL_FILE = {debian.acl_dir}/policyd_rcpt.acl" in rendered
    assert f"CHECK_DATA_LOCAL_ACL_FILE = {debian.acl_dir}/policyd_data.acl" in rendered
    assert ".include" not in rendered.split("acl_check_rcpt:")[1].split("accept")[0]
    assert hook(split_root, "status") == 0
    assert "outbound fragment included: no" in capsys.readouterr().out

    # Again: nothing to change, nothing run.
    assert hook(split_root, "enable") == 0
    assert "nothing to change" in capsys.readouterr().out

    assert hook(split_root, "disable") == 0
    assert tree_digest(split_root / "etc/exim4") == before
    assert "CHECK_RCPT_LOCAL_ACL_FILE =" not in debian.rendered.read_text()
    assert hook(split_root, "disable") == 0
    assert "nothing to change" in capsys.readouterr().out


def test_outbound_edits_debians_acl_only_on_request_and_disable_removes_it(
    split_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    debian = exim_hook.Debian(split_root)
    check_rcpt = debian.check_rcpt(split=True)
    original = check_rcpt.read_text()
    assert hook(split_root, "enable") == 0
    assert check_rcpt.read_text() == original  # no conffile edit without --outbound

    assert hook(split_root, "enable", "--outbound") == 0, capsys.readouterr()
    edited = check_rcpt.read_text()
    include = debian.outbound_include()
    assert edited.count(include) == 1
    # Just before Debian's accept of relay hosts, after its other checks.
    assert re.search(rf"{re.escape(include)}[ \t]*accept[ \t]*\n[ \t]*hosts = \+relay", edited)
    assert include.strip() in debian.rendered.read_text()
    capsys.readouterr()
    assert hook(split_root, "status") == 0
    assert "outbound fragment included: yes" in capsys.readouterr().out
    assert hook(split_root, "enable", "--outbound") == 0  # once only
    assert check_rcpt.read_text().count(include) == 1

    assert hook(split_root, "disable") == 0
    assert check_rcpt.read_text() == original


def test_single_file_layout_appends_a_block_and_disable_keeps_the_sites_own_macros(
    single_root: Path,
) -> None:
    debian = exim_hook.Debian(single_root)
    site = "# the site's own\nMAIN_TLS_ENABLE = yes\n"
    debian.localmacros.write_text(site)
    assert hook(single_root, "enable") == 0
    text = debian.localmacros.read_text()
    assert text.startswith(site)  # overrides above the block keep working (.ifndef)
    block = text[len(site) :]
    assert block.startswith(exim_hook.BLOCK_BEGIN + "\n")
    assert block.endswith(exim_hook.BLOCK_END + "\n")
    assert f"CHECK_RCPT_LOCAL_ACL_FILE = {debian.acl_dir}/policyd_rcpt.acl" in block
    assert "POLICYD_SOCKET = /run/policyd/policyd.sock" in block
    assert not debian.macros_file.exists()  # conf.d/main is not read in this layout
    assert (debian.acl_dir / "policyd_rcpt.acl").exists()

    assert hook(single_root, "disable") == 0
    assert debian.localmacros.read_text() == site


def test_single_file_layout_disable_removes_a_localmacros_file_it_created(
    single_root: Path,
) -> None:
    before = tree_digest(single_root / "etc/exim4")
    debian = exim_hook.Debian(single_root)
    assert not debian.localmacros.exists()
    assert hook(single_root, "enable") == 0
    assert debian.localmacros.exists()
    assert hook(single_root, "disable") == 0
    assert tree_digest(single_root / "etc/exim4") == before


def test_a_failed_check_puts_every_file_back(
    split_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The site already uses the RCPT hook: 00_policyd would define the macro twice.
    debian = exim_hook.Debian(split_root)
    (debian.confdir / "conf.d/main/000_localmacros").write_text(
        "CHECK_RCPT_LOCAL_ACL_FILE = /etc/exim4/site_rcpt.acl\n"
    )
    assert exim_hook.DebianTools(debian).render().ok  # the site's config as it is
    rendered = debian.rendered.read_text()
    before = tree_digest(split_root / "etc/exim4")
    capsys.readouterr()

    assert hook(split_root, "enable", "--outbound") == 1
    err = capsys.readouterr().err
    assert "every file is back as it was" in err
    assert 'macro "CHECK_RCPT_LOCAL_ACL_FILE" is already defined' in err, err
    assert tree_digest(split_root / "etc/exim4") == before
    assert debian.rendered.read_text() == rendered


def test_missing_fragments_and_a_missing_configuration_are_named(
    lab: Lab, split_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = lab.subdir("no-snippets")
    assert main(["exim", "enable", "--root", str(split_root), "--snippets", str(empty)]) == 1
    assert f"{empty}/00_policyd is missing: give --snippets DIR" in capsys.readouterr().err
    nowhere = lab.subdir("no-exim")
    assert hook(nowhere, "enable") == 1
    assert "no Debian Exim configuration" in capsys.readouterr().err
