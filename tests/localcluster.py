"""A real multi-node Ray cluster on this machine: one `ray start --head` and more `ray start` nodes.

Each node gets its own ports (others' Ray instances on the machine keep theirs) and its own
--temp-dir in a private folder, so `ray start` records its address there and not in /tmp/ray, where
a plain `ray.init()` elsewhere would find it and join. Token authentication is on, with a token of the
cluster's own in RAY_AUTH_TOKEN (~/.ray/auth_token is left alone). `stop()` ends exactly the
processes this cluster started, by pid: every `ray start --block` it launched, their descendants,
and any orphan that carries the cluster's token in its environment (never `ray stop`, which would
end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    def __init__(self, node_cpus=(2, 2), *, env: dict | None = None):
        self.node_cpus = list(node_cpus)  # the first is the head
        self.env = {**(env if env is not None else os.environ), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        # As if this venv were activated: job entrypoints say `python`, which must be this one.
        self.env["PATH"] = os.pathsep.join([os.path.dirname(RAY), self.env.get("PATH", "")])
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="rcx", dir="/tmp")  # short: Ray's unix sockets live below it
        self.gcs_port, self.dashboard_port, client_port = _free_ports(3)  # fixed across restarts
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self._head_args = ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                           "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(client_port)]

    def start(self, timeout: float = 180, attempts: int = 3) -> "LocalCluster":
        """Start the nodes one after another (less contention on a busy machine). Ray gives a node
        30 s to register and exits otherwise; a node that timed out is cleaned up and started again."""
        try:
            for i in range(len(self.node_cpus)):
                for attempt in range(attempts):
                    self._start_node(i, self._head_args if i == 0 else ["--address", self.address], attempt)
                    try:
                        self.wait_for_nodes(i + 1, timeout)
                        break
                    except NodeStartError:
                        self._kill(_with_env("CXR_TEST_NODE", self._marker(i, attempt)))
                        self.procs.pop()
                        if attempt == attempts - 1:
                            raise
        except BaseException:
            self.stop()
            raise
        return self

    def _marker(self, i: int, attempt: int) -> str:
        return f"{self.env['RAY_AUTH_TOKEN'][:12]}-{i}-{attempt}"

    def _start_node(self, i: int, role_args: list[str], attempt: int) -> None:
        lo = _free_range(60)
        agent, agent_grpc, runtime_env, metrics = _free_ports(4)
        cmd = [RAY, "start", "--block", *role_args, "--num-cpus", str(self.node_cpus[i]), "--num-gpus", "0",
               "--min-worker-port", str(lo), "--max-worker-port", str(lo + 59),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
               # A temp dir per node, as on separate machines: nodes sharing one would unpack the job's
               # working_dir into the same folder, each deleting it under the others' running processes.
               "--temp-dir", os.path.join(self.tmp, f"n{i}"), "--disable-usage-stats"]
        env = {**self.env, "CXR_TEST_NODE": self._marker(i, attempt)}  # marks this node's processes
        with open(self._log(i), "a") as log:
            # A session of its own: our processes never share a process group with the test runner.
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def _log(self, i: int) -> str:
        return os.path.join(self.tmp, f"node{i}.log")

    def state(self, kind: str, **filters: str) -> list[dict]:
        """Ray's state API (/api/v0/<kind>) over plain HTTP with the cluster's token, e.g.
        state("actors", class_name="RayTrainWorker"). Not through ray.util.state: Ray caches the
        first auth token a process loads, and this process may later start a Ray of its own."""
        query = [("limit", "10000"), ("detail", "false")]
        for key, value in filters.items():
            query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
        request = urllib.request.Request(f"{self.dashboard}/api/v0/{kind}?{urllib.parse.urlencode(query)}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        if not body.get("result"):
            raise RuntimeError(f"state API /api/v0/{kind}: {body.get('msg')}")
        return body["data"]["result"]["result"]

    def nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float) -> None:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            for i, p in enumerate(self.procs):
                if p.poll() is not None:
                    raise NodeStartError(f"ray start (node {i}) exited {p.returncode}:\n{_tail(self._log(i))}")
            try:
                if len(self.nodes()) >= n:
                    return
            except Exception as e:  # the dashboard is still starting
                last = e
            time.sleep(2)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout:.0f} s ({last}):\n{_tail(self._log(0))}")

    def cli(self, *args: str, env: dict | None = None, timeout: float = 600, cwd=None) -> subprocess.CompletedProcess:
        """Run a `ray ...` command against this cluster, with its token."""
        return subprocess.run([RAY, *args], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    def stop(self) -> None:
        pids = set(_with_env("RAY_AUTH_TOKEN", self.env["RAY_AUTH_TOKEN"]))  # orphans included
        for p in self.procs:
            pids |= {p.pid, *_descendants(p.pid)}
        self._kill(pids)
        self._kill(_with_env("RAY_AUTH_TOKEN", self.env["RAY_AUTH_TOKEN"]), grace=2)  # started meanwhile
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    @staticmethod
    def _kill(pids, grace: float = 8) -> None:
        pids = set(pids)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.5)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        deadline = time.time() + 5  # gone before the caller deletes their folders (logs land there)
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)


class NodeStartError(RuntimeError):
    pass


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _free_range(size: int) -> int:
    """Start of ``size`` consecutive free ports below the kernel's ephemeral range (32768+), away
    from Ray's default worker ports (10002-19999) that other Ray instances may use."""
    for _ in range(200):
        lo = random.randrange(20000, 32000 - size)
        try:
            socks = []
            for port in range(lo, lo + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return lo
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for Ray workers")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            out.setdefault(ppid, []).append(int(d))
    return out


def _descendants(pid: int) -> list[int]:
    children, out, stack = _children(), [], [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds key=value: the cluster's random token marks all of ours."""
    needle, out = f"{key}={value}".encode(), []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(int(d))
            except OSError:
                continue
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""
