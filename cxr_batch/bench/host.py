"""What every benchmark shares: the machine it ran on, and a measured step run in a fresh Python that
prints its result as the last line of its stdout, in JSON (its imports, start-up and peak memory are
then its own, not the benchmark's)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess


def machine() -> dict:
    """CPU model, count and bf16 instructions, memory, host and load at the start; no torch or Ray
    (the callers that use them add their versions)."""
    with open("/proc/cpuinfo") as f:
        info = f.read().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    with open("/proc/meminfo") as f:
        mem_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
            "host": socket.gethostname(), "python": platform.python_version(), "loadavg_start": list(os.getloadavg())}


def run_json(command: list[str], *, what: str, env: dict | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Run ``command``; -> (the JSON object on its last stdout line, the finished process). A failed
    or silent run raises RuntimeError naming ``what`` with the last line it wrote."""
    p = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{what} exited with {p.returncode}: {tail[0]}")
    return json.loads(lines[-1]), p
