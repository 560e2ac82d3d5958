"""Postfix's smtp-sink as a remote MX: it records each transaction in a file."""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.support import free_port

SMTP_SINK = "/usr/sbin/smtp-sink"


@dataclass
class Captured:
    """One transaction: smtp-sink's X- header fields, then the message."""

    mail_args: str
    rcpt_args: list[str]
    message: EmailMessage
    raw: bytes


class Sink:
    def __init__(self, ip: str = "127.0.0.2", *flags: str, port: int | None = None) -> None:
        self.ip = ip
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gehirn-sink-"))
        os.chmod(self.dir, 0o777)
        cmd = [SMTP_SINK, *flags, "-d", f"{self.dir}/%M.", f"{ip}:{self.port}", "64"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def captured(self) -> list[Captured]:
        out = []
        for path in sorted(self.dir.iterdir()):
            raw = path.read_bytes()
            if not raw.endswith(b"\n"):
                continue  # still being written
            head, _, rest = raw.partition(b"Received: ")
            fields: dict[str, Any] = {"X-Rcpt-Args": []}
            for line in head.decode().splitlines():
                name, _, value = line.partition(": ")
                if name == "X-Rcpt-Args":
                    fields[name].append(value)
                else:
                    fields[name] = value
            # smtp-sink writes its Received field, then the message as sent.
            body = b"Received: " + rest
            parsed = email.message_from_bytes(body, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            out.append(Captured(fields.get("X-Mail-Args", ""), fields["X-Rcpt-Args"], parsed, body))
        return out
