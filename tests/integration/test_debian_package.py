"""The Debian package: built (dpkg-buildpackage, dh-virtualenv), installed on this
machine, the daemon started from the installed files as the service user, a message
sent to it with swaks and read back, then the package purged.

Slow (the build takes a minute or two); `make test` runs it as root with the build
tools installed.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.integration.procs import ROOT, wait_for
from tests.support import free_port

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg-buildpackage") is None,
    reason="make test builds and installs the package as root",
)

CONF = Path("/etc/gehirn-ts/gehirn-ts.toml")
TEST_CONF = Path("/etc/gehirn-ts/test.toml")
VENV = Path("/opt/venvs/gehirn-ts")
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, **kw)  # type: ignore[call-overload, no-any-return]


def test_the_package_builds_installs_runs_as_its_user_and_purges(tmp_path: Path) -> None:
    out = run(str(ROOT / "scripts" / "build-deb"), str(tmp_path))
    deb = Path(out.stdout.strip().splitlines()[-1])
    assert deb.name.startswith("gehirn-ts_") and deb.suffix == ".deb"
    subprocess.run(["apt-get", "purge", "-y", "-qq", "gehirn-ts"], capture_output=True)
    run(
        "apt-get",
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        str(deb),
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    proc = None
    try:
        # What the package set up.
        user = pwd.getpwnam("gehirn-ts")
        for d in ("/var/lib/gehirn-ts", "/var/spool/gehirn-ts"):
            st = os.stat(d)
            assert (st.st_uid, oct(st.st_mode & 0o777)) == (user.pw_uid, "0o750")
        st = CONF.stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (
            0,
            grp.getgrnam("gehirn-ts").gr_gid,
            "0o640",
        )
        assert (
            "/etc/gehirn-ts/gehirn-ts.toml"
            in run("dpkg-query", "-W", "-f=${Conffiles}", "gehirn-ts").stdout
        )
        unit = Path("/lib/systemd/system/gehirn-ts.service").read_text()
        for line in (
            "User=gehirn-ts",
            "ExecStart=/opt/venvs/gehirn-ts/bin/gehirn-tsd --logger gehirn_ts.logs.text_observer "
            "--nodaemon --pidfile= gehirn-ts "
            "--config /etc/gehirn-ts/gehirn-ts.toml",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/gehirn-ts /var/spool/gehirn-ts",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        ):
            assert line in unit.splitlines(), line
        assert list((VENV / "lib").glob("python3*/site-packages/twisted/plugins/dropin.cache"))
        # The installed config, on free ports for this test (the service uses 25/587/465).
        smtp, http = free_port(), free_port()
        text = CONF.read_text()
        text = text.replace('listen = "tcp:25"', f'listen = "tcp:{smtp}:interface=127.0.0.1"')
        text = text.replace('submission = "tcp:587"', 'submission = ""')
        text = text.replace('submissions = "tcp:465"', 'submissions = ""')
        text = text.replace(
            'listen = "tcp:8025:interface=127.0.0.1"', f'listen = "tcp:{http}:interface=127.0.0.1"'
        )
        TEST_CONF.write_text(text)
        shutil.chown(TEST_CONF, "root", "gehirn-ts")
        TEST_CONF.chmod(0o640)
        proc = subprocess.Popen(
            [
                "runuser",
                "-u",
                "gehirn-ts",
                "--",
                str(VENV / "bin" / "gehirn-tsd"),
                "--logger",
                "gehirn_ts.logs.text_observer",
                "--nodaemon",
                "--pidfile=",
                "gehirn-ts",
                "--config",
                str(TEST_CONF),
            ],
            cwd="/var/lib/gehirn-ts",
            env=CLEAN_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            assert proc is not None and proc.poll() is None, (
                proc and proc.stdout and proc.stdout.read()
            )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(healthy, timeout=60)
        swaks = run(
            "swaks",
            "--server",
            f"127.0.0.1:{smtp}",
            "--to",
            "someone@localhost",
            "--from",
            "me@example.org",
            "--header",
            "Subject: from the package test",
        )
        qid = [line for line in swaks.stdout.splitlines() if "queued as" in line][-1].split()[-1]
        admin = Path("/var/lib/gehirn-ts/admin.key").read_text().strip()
        assert oct(Path("/var/lib/gehirn-ts/admin.key").stat().st_mode & 0o777) == "0o600"

        def received() -> dict[str, object] | None:
            req = urllib.request.Request(f"http://127.0.0.1:{http}/v1/received/{qid}")
            req.add_header("authorization", f"Bearer {admin}")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return dict(json.loads(r.read()))
            except OSError:
                return None

        got = wait_for(received, timeout=30)
        assert got["subject"] == "from the package test"
        # Files the daemon made belong to its user.
        assert Path("/var/lib/gehirn-ts/gehirn-ts.sqlite").stat().st_uid == user.pw_uid
        assert list(Path("/var/spool/gehirn-ts").iterdir())
        # The CLI on the PATH, as the service user.
        keys = run(
            "runuser",
            "-u",
            "gehirn-ts",
            "--",
            "/usr/sbin/gehirn-ts",
            "--config",
            str(TEST_CONF),
            "--json",
            "dkim",
            "list",
            cwd="/var/lib/gehirn-ts",
            env=CLEAN_ENV,
        )
        assert json.loads(keys.stdout)[0]["domain"] == "localhost"
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        TEST_CONF.unlink(missing_ok=True)
        subprocess.run(
            ["apt-get", "purge", "-y", "-qq", "gehirn-ts"], capture_output=True, timeout=300
        )
    for gone in (
        "/opt/venvs/gehirn-ts",
        "/var/lib/gehirn-ts",
        "/var/spool/gehirn-ts",
        "/etc/gehirn-ts",
    ):
        assert not Path(gone).exists(), gone
