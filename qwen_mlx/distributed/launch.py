"""`qwen-mlx launch`: run one qwen-mlx command on several ranks (Macs), rank 0 in this terminal.

mlx.launch passes every rank's input and output through itself, line by line: fine for `generate`, not for the
chat app, which needs the terminal itself (raw keys, Esc). This writes the ring hostfile mlx.launch would write,
starts ranks 1.. over ssh (or as local processes on 127.0.0.1) with their output in a log file, and runs rank 0 in
this process. A rank that ends with an error before rank 0 has noticed (e.g. ssh cannot reach its host) ends
everything with one line within a few seconds.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qwen_mlx.errors import UserError

LOCAL = ("127.0.0.1", "localhost")


def ring_hostfile(ips: list[str], port: int) -> list[list[str]]:
    """MLX's ring hostfile: one list of "ip:port" per rank (ports counted up from `port`, as mlx.launch does)."""
    return [[f"{ip}:{port + rank}"] for rank, ip in enumerate(ips)]


def _ip(host: str) -> str:
    try:
        return socket.gethostbyname(host)
    except OSError:
        raise UserError(f"--hosts: cannot resolve {host!r}; give its IP address (e.g. its Thunderbolt Bridge IP)") \
            from None


def _start(rank: int, host: str, command: list[str], python: str, ring: str, hostfile: Path, log) -> subprocess.Popen:
    if host in LOCAL:
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        return subprocess.Popen([python, "-m", "qwen_mlx.cli", *command], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    script = (f"cd {shlex.quote(os.getcwd())} 2>/dev/null; f=$(mktemp); printf %s {shlex.quote(ring)} > $f; "
              f"MLX_RANK={rank} MLX_HOSTFILE=$f exec {shlex.quote(python)} -m qwen_mlx.cli {shlex.join(command)}")
    return subprocess.Popen(["ssh", "-o", "BatchMode=yes", host, script], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _watch(others: list[tuple[str, subprocess.Popen]], log_path: Path) -> None:
    """End this process when another rank fails first (its error would otherwise surface only as a timeout)."""
    while True:
        for rank, (host, proc) in enumerate(others, 1):
            code = proc.poll()
            if code:
                time.sleep(3)  # usually rank 0 sees the closed connection itself and ends with its own line
                sys.stderr.write(f"qwen-mlx launch: rank {rank} on {host} ended with exit code {code}; its output "
                                 f"is in {log_path}\n")
                sys.stderr.flush()
                os._exit(1)
        time.sleep(0.2)


def launch(hosts: list[str], command: list[str], *, python: str, port: int, main: Callable[[list[str]], int]) -> int:
    """Run `qwen-mlx COMMAND` as rank 0 here (hosts[0] is this machine), through `main` (the CLI's, passed in so
    that this module does not import the face above it), and as ranks 1.. on the other hosts."""
    if not command:
        raise UserError("give the command after --, e.g. qwen-mlx launch -n 2 -- chat -m MODEL --distributed auto")
    ring = json.dumps(ring_hostfile([_ip(h) for h in hosts], port))
    workdir = Path(tempfile.mkdtemp(prefix="qwen-mlx-launch-"))
    hostfile, log_path = workdir / "hostfile.json", workdir / "ranks.log"
    hostfile.write_text(ring)
    with open(log_path, "w") as log:
        others = [(host, _start(rank, host, command, python, ring, hostfile, log))
                  for rank, host in enumerate(hosts[1:], 1)]
    os.environ.update(MLX_RANK="0", MLX_HOSTFILE=str(hostfile))
    threading.Thread(target=_watch, args=(others, log_path), daemon=True).start()
    try:
        return main(command)
    finally:
        deadline = time.monotonic() + 10
        for _, proc in others:  # they end once rank 0 has said the session is over
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
