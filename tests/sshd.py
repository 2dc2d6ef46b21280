"""A real OpenSSH server for the tests, with key login only, in a folder of its own.

::

    SshServer.start(folder, address)   sshd (Debian's openssh-server) on address:port,
                                       under subreaper.py, optionally inside a network
                                       namespace (``netns=``): a "worker host"
      folder/ssh_host_ed25519_key      its host key (pinned in folder/known_hosts)
      folder/id_ed25519                the only key it lets in (as this user)
      folder/sshd.log                  its log, quoted in failure messages
    server.ssh_command                 "ssh -p PORT -i KEY -o ..." for $FADE_SSH
    server.stop()                      ends sshd and whatever its sessions left running

Nothing under /etc/ssh is read or changed (sshd gets ``-f`` and ``-h``); sshd needs
its privilege-separation folder /run/sshd, which is created if missing. Sessions
get ``FADE_CODE_CACHE`` (``SetEnv``) so that workers keep shipped code in the
folder rather than in the home directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SshServer", "SshUnavailable"]

SUBREAPER = Path(__file__).resolve().parent / "subreaper.py"
START_TIMEOUT = 15.0


class SshUnavailable(Exception):
    """sshd cannot run here; the message says why (the tests skip with it)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class SshServer:
    folder: Path
    address: str
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, folder: Path, address: str = "127.0.0.1", netns: str | None = None) -> SshServer:
        """sshd listening on ``address`` (inside ``netns`` if given); raises SshUnavailable."""
        sshd = shutil.which("sshd") or (
            "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None
        )
        if sshd is None or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
            raise SshUnavailable(
                "sshd, ssh or ssh-keygen not installed: Debian's openssh-server and "
                "openssh-client packages are needed (.ci/run installs them)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for key in ("ssh_host_ed25519_key", "id_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)],
                check=True,
                timeout=30,
            )
        (folder / "authorized_keys").write_text((folder / "id_ed25519.pub").read_text())
        (folder / "authorized_keys").chmod(0o600)
        port = _free_port()
        host_key = (folder / "ssh_host_ed25519_key.pub").read_text().split()
        (folder / "known_hosts").write_text(f"[{address}]:{port} {host_key[0]} {host_key[1]}\n")
        (folder / "code-cache").mkdir(exist_ok=True)
        (folder / "sshd_config").write_text(
            f"""\
ListenAddress {address}
Port {port}
HostKey {folder / "ssh_host_ed25519_key"}
PidFile {folder / "sshd.pid"}
AuthorizedKeysFile {folder / "authorized_keys"}
# Its files are under /tmp, which is writable by all (sticky): StrictModes refuses that.
StrictModes no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
PrintMotd no
SetEnv FADE_CODE_CACHE={folder / "code-cache"}
LogLevel VERBOSE
"""
        )
        argv = [sys.executable, str(SUBREAPER), sshd, "-D", "-e", "-f", str(folder / "sshd_config")]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        with (folder / "sshd.log").open("ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=log, stdout=log)
        server = cls(folder, address, port, process)
        deadline = time.monotonic() + START_TIMEOUT
        while server.run("true", check=False).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise SshUnavailable(f"sshd did not start:\n{server.log()}")
            time.sleep(0.2)
        return server

    @property
    def ssh_command(self) -> str:
        """The ssh command line that logs in here with the key (for ``$FADE_SSH``)."""
        return (
            f"ssh -p {self.port} -i {self.folder / 'id_ed25519'} -o BatchMode=yes "
            f"-o IdentitiesOnly=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={self.folder / 'known_hosts'} -o ConnectTimeout=10"
        )

    def run(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``command`` run on this host over SSH."""
        out = subprocess.run(
            [*self.ssh_command.split(), self.address, command],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        if check and out.returncode != 0:
            raise AssertionError(f"ssh {command!r}: status {out.returncode}: {out.stderr}")
        return out

    def log(self) -> str:
        return (self.folder / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        """End sshd; the subreaper then ends what its sessions left running."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
