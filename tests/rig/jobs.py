"""Writing configs for test accounts and running the tool, in-process or as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from migrate import config as cfg
from migrate.engine import run_jobs
from migrate.results import JobResult
from migrate.runner import RunOptions


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def write_config(path: Path, jobs: list[dict], state_url: str | None = None) -> Path:
    lines = []
    if state_url:
        lines += ["[state]", f"url = {toml_value(state_url)}", ""]
    for job in jobs:
        lines.append("[[jobs]]")
        tables = {k: v for k, v in job.items() if isinstance(v, dict) and k != "map"}
        for k, v in job.items():
            if k not in tables:
                lines.append(f"{k} = {toml_value(v)}")
        for name, table in tables.items():
            lines.append(f"[jobs.{name}]")
            for k, v in table.items():
                lines.append(f"{k} = {toml_value(v)}")
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def imap_job(name, old_account, new_account, **extra) -> dict:
    job = {"name": name, "kind": "imap-copy",
           "source": old_account.endpoint_toml("imap"),
           "destination": new_account.endpoint_toml("imap")}
    job.update(extra)
    return job


def run(config_path: Path, dry_run: bool = False, **options) -> JobResult:
    config = cfg.load(config_path)
    options.setdefault("progress", False)
    opts = RunOptions(dry_run=dry_run, retry_wait=0.05, **options)
    (result,) = run_jobs(config, None, opts)
    return result


def run_measuring_memory(config_path: Path, **options) -> tuple[JobResult, int]:
    """run(), also returning the peak of Python allocations during the run (bytes)."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = run(config_path, **options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def run_cli(*args: str, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "migrate", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout, check=False)
