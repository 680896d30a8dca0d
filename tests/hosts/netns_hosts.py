"""Test hosts made of Linux network namespaces, each running its own sshd: a stand-in for on-prem machines.

Layout (all of it created here, all of it removed by `NetnsHosts.down()`):

    root namespace                      namespace cst-h0            namespace cst-h1
    bridge cstbr0 10.200.0.1/24 ──veth── cstv0p 10.200.0.10/24     cstv1p 10.200.0.11/24 ──veth── (bridge)
                                        sshd on 10.200.0.10:22     sshd on 10.200.0.11:22

Why this works as "two machines" for Ray: every process a host's sshd starts lives in that host's network
namespace (its own IP, loopback and ports, so two raylets and two GCS ports do not clash), in its own PID
namespace (so `ray stop` on one host cannot see, and kill, another host's Ray) and in a private mount
namespace where `/root` (HOME of the ssh user) and `/tmp/ray` (Ray's session folder) are bind-mounted
from the host's own folder. The rest of the filesystem (the repo, the venv) is shared, as on a cluster with
an NFS home. The namespaces have no default route: nothing in them can reach any address we did not create.

Only root can do this; `skip_reason()` says why a machine cannot. Run by hand:
    sudo python tests/hosts/netns_hosts.py up      # prints the ssh command for each host
    sudo python tests/hosts/netns_hosts.py down    # removes every cst-* namespace, the bridge, their processes
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "cst"                # names of everything created here start with this (namespaces cst-h0, ...)
BRIDGE = f"{PREFIX}br0"
SUBNET = "10.200.0"           # a private /24 made only for the test; the root side of the bridge is .1
BRIDGE_IP = f"{SUBNET}.1"
FIRST_HOST = 10               # host i gets 10.200.0.(10 + i)
SSHD = "/usr/sbin/sshd"


def skip_reason() -> str | None:
    """Why test hosts cannot be made on this machine (None when they can)."""
    if os.geteuid() != 0:
        return "test hosts need root (network namespaces, bind mounts, sshd)"
    for tool in ("ip", "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install -y iproute2 openssh-client rsync)"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} not found (apt-get install -y openssh-server)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` unavailable: {probe.stderr.strip()}"
    return None


def _sh(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class NetnsHost:
    name: str                 # namespace name, e.g. cst-h0
    ip: str
    root: Path                # this host's private folder: home/, ray-tmp/, sshd_config, sshd.log
    sshd: subprocess.Popen | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    def pids(self) -> list[int]:
        """Every process living in this host's network namespace (sshd, shells, Ray)."""
        out = _sh("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class NetnsHosts:
    """`count` test hosts reachable over ssh as root with `key` (a fresh ed25519 key)."""

    count: int = 2
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=f"{PREFIX}-", dir="/tmp")))
    env: dict[str, str] = field(default_factory=dict)   # exported in every ssh session (written to ~/.bashrc)
    hosts: list[NetnsHost] = field(default_factory=list)

    @property
    def key(self) -> Path:
        return self.base / "id_ed25519"

    def __enter__(self) -> "NetnsHosts":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ---------------------------------------------------------------- create
    def up(self) -> None:
        if _sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
            raise RuntimeError(f"{BRIDGE} already exists: another test-host run is active or was not cleaned up "
                               f"(remove it with: python {Path(__file__).as_posix()} down)")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key))
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.base / "host_key"))
        (self.base / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        Path("/run/sshd").mkdir(exist_ok=True)   # sshd's privilege-separation folder (the deb makes it at boot)
        Path("/tmp/ray").mkdir(exist_ok=True)    # mount point for each host's private Ray session folder

        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for i in range(self.count):
            host = NetnsHost(name=f"{PREFIX}-h{i}", ip=f"{SUBNET}.{FIRST_HOST + i}", root=self.base / f"h{i}")
            self.hosts.append(host)
            self._make_namespace(i, host)
            self._start_sshd(host)
        for host in self.hosts:
            self._wait_for_ssh(host)

    def _make_namespace(self, i: int, host: NetnsHost) -> None:
        veth, peer = f"{PREFIX}v{i}", f"{PREFIX}v{i}p"
        _sh("ip", "netns", "add", host.name)
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer, "netns", host.name)
        _sh("ip", "link", "set", veth, "master", BRIDGE, "up")
        ns = ("ip", "netns", "exec", host.name)
        _sh(*ns, "ip", "addr", "add", f"{host.ip}/24", "dev", peer)
        _sh(*ns, "ip", "link", "set", peer, "up")
        _sh(*ns, "ip", "link", "set", "lo", "up")

    def _start_sshd(self, host: NetnsHost) -> None:
        (host.home / ".ssh").mkdir(parents=True)
        (host.root / "ray-tmp").mkdir()
        # Ray's command runner sources ~/.bashrc before every command: put the test's venv first on PATH.
        exports = {"PATH": f"{Path(sys.executable).parent}:"
                           "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "RAY_USAGE_STATS_ENABLED": "0", **self.env}
        (host.home / ".bashrc").write_text("".join(f"export {k}='{v}'\n" for k, v in exports.items()))
        (host.home / ".profile").write_text(". ~/.bashrc\n")   # login shells (our `ssh()`) read this one
        config = host.root / "sshd_config"
        config.write_text(f"""\
ListenAddress {host.ip}
Port 22
HostKey {self.base / 'host_key'}
PidFile {host.root / 'sshd.pid'}
AuthorizedKeysFile {self.base / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
# Ray's launcher opens several multiplexed sessions at once.
MaxStartups 64
MaxSessions 64
Subsystem sftp internal-sftp
""")
        # `ip netns exec` already gives the command its own mount namespace (slave of the root one), so these
        # bind mounts are seen only by this sshd and everything it starts.
        # The real /root disappears under the host's home, so first re-expose what lives there and the
        # hosts need (pyenv's Python behind the venv, for one) inside the new home, then bind recursively.
        keep = sorted({p for p in (Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve())
                       if p.is_relative_to("/root")})
        binds = [f"mkdir -p {host.home / p.relative_to('/root')} && "
                 f"mount --bind {p} {host.home / p.relative_to('/root')}"
                 for p in keep]
        script = " && ".join(binds + [f"mount --rbind {host.home} /root",
                                      f"mount --bind {host.root / 'ray-tmp'} /tmp/ray",
                                      f"exec {SSHD} -D -e -f {config}"])
        log = open(host.root / "sshd.log", "wb")
        # A PID namespace too: `ray stop` (run by `ray up` on every node and by `ray down`) kills every Ray
        # process it can see, so without one a worker's `ray stop` kills the head's Ray, and any other Ray
        # running on this machine. sshd is PID 1 there; killing it ends every process the host started.
        host.sshd = subprocess.Popen(["ip", "netns", "exec", host.name,
                                      "unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def _wait_for_ssh(self, host: NetnsHost, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if host.sshd.poll() is not None:
                raise RuntimeError(f"sshd on {host.name} exited: {(host.root / 'sshd.log').read_text()}")
            if self.ssh(host, "true", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"sshd on {host.name} ({host.ip}) not reachable within {timeout} s: "
                           f"{(host.root / 'sshd.log').read_text()}")

    # ---------------------------------------------------------------- use
    def ssh_args(self, host: NetnsHost) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=5", f"root@{host.ip}"]

    def ssh(self, host: NetnsHost, command: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `command` on `host` through a login shell (as Ray's launcher does)."""
        proc = subprocess.run(self.ssh_args(host) + [f"bash --login -c -i {_quote(command)}"],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ssh {host.name}: {command!r} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return proc

    # ---------------------------------------------------------------- remove
    def down(self) -> None:
        """Kill every process in our namespaces, delete them, the bridge and the folder. Safe to call twice."""
        for host in self.hosts:
            _kill_namespace(host.name)
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.kill()
                host.sshd.wait(timeout=10)
        remove_all(names=[h.name for h in self.hosts])
        shutil.rmtree(self.base, ignore_errors=True)
        self.hosts = []


def _quote(command: str) -> str:
    return "'" + command.replace("'", "'\"'\"'") + "'"


def _kill_namespace(name: str, grace: float = 5.0) -> None:
    """TERM then KILL every process in network namespace `name` (only processes the test started live there)."""
    def pids() -> list[int]:
        out = _sh("ip", "netns", "pids", name, check=False).stdout
        return [int(p) for p in out.split()]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids():
            return


def namespaces() -> list[str]:
    """Our test namespaces that exist now."""
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{PREFIX}-h")]


def remove_all(names: list[str] | None = None) -> None:
    """Remove the named test namespaces (default: every cst-h* one), their processes, and the bridge."""
    for name in names if names is not None else namespaces():
        _kill_namespace(name)
        _sh("ip", "netns", "del", name, check=False)   # deleting the namespace deletes its veth pair
    _sh("ip", "link", "del", BRIDGE, check=False)


def reachable(ip: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


if __name__ == "__main__":
    action = sys.argv[1] if len(sys.argv) > 1 else "up"
    if action == "down":
        remove_all()
        print("removed test namespaces and bridge")
    elif action == "up":
        reason = skip_reason()
        if reason:
            sys.exit(reason)
        hosts = NetnsHosts(count=int(sys.argv[2]) if len(sys.argv) > 2 else 2)
        hosts.__enter__()
        for h in hosts.hosts:
            print(f"{h.name}: {' '.join(hosts.ssh_args(h))}")
        print(f"folder {hosts.base}; remove with: python {sys.argv[0]} down && rm -rf {hosts.base}")
        for h in hosts.hosts:
            h.sshd = None   # leave them running after this process exits
    else:
        sys.exit(f"unknown action {action!r}: use up | down")
