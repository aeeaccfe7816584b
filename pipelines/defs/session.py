"""One command under a Dagster Pipes session: what the stage says while it runs, and why it failed.

Notable:
- `open_pipes_session` and a Popen of our own instead of PipesSubprocessClient.run,
  for two things that client cannot give: the stage's messages *while* it runs (the
  client returns them only at the end), and its messages after a failure (the
  client raises before handing them over).
- While the command runs, progress messages (nanoforge/pipes.py: the per-step line
  and its numbers) become a log line and an AssetObservation each, so the run's log
  and the asset's page show step, loss, tok/s and ETA as training goes.
- The stage's own error (`pipes.error`) is the failure's message; when a stage sent
  none (a crash), dvc_exec.error_from_output finds it in the output.
- A cancel from the UI (DagsterExecutionInterruptedError) sends SIGINT, as the
  client does; dvc_exec turns it into one SIGTERM for the stage (under `launch.launcher:
  slurm`, nanoforge.launch makes that `scancel --signal=TERM`: the job checkpoints).
- The Pipes channel is two files under the project (.pipes/<run>-<random>/), not in /tmp:
  under Slurm the stage runs on a cluster node, which sees the project's (shared)
  filesystem but not this machine's /tmp.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError

POLL_S = 0.5
CHANNEL_DIR = ".pipes"  # under the project root: .gitignore'd, never a DVC output


@dataclass
class Outcome:
    """What came back from the command: its exit code, what the stage reported, its error."""

    returncode: int | None
    metadata: dict[str, dg.MetadataValue] = field(default_factory=dict)
    error: str | None = None  # the stage's own message (pipes.error), if it sent one
    progress: int = 0  # progress messages relayed while it ran


class Relay:
    """Turns the stage's custom Pipes messages into Dagster events as they arrive."""

    def __init__(self, context: dg.AssetExecutionContext, session: dg.PipesSession):
        self.context, self.session = context, session
        self.seen = 0
        self.error: str | None = None
        self.progress = 0

    def drain(self) -> None:
        messages = self.session.get_custom_messages()
        for message in messages[self.seen:]:
            self._handle(message)
        self.seen = len(messages)

    def _handle(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        kind = message.get("nanoforge")
        if kind == "error":
            self.error = str(message.get("message") or "").strip() or None
        elif kind == "progress":
            self.progress += 1
            line = str(message.get("line") or "")
            if line:
                self.context.log.info(line)
            numbers = {k: v for k, v in (message.get("numbers") or {}).items()
                       if isinstance(v, (int, float, str, bool))}
            if numbers:
                self.context.log_event(dg.AssetObservation(asset_key=self.context.asset_key, metadata=numbers))


def run_command(context: dg.AssetExecutionContext, command: list[str], cwd: str, env: dict[str, str],
                termination_timeout_s: float) -> Outcome:
    """Run `command` under a Pipes session; relay progress live; return what came back (never raises on exit code)."""
    channel = Path(cwd) / CHANNEL_DIR / f"{context.run_id}-{uuid.uuid4().hex[:8]}"
    channel.mkdir(parents=True, exist_ok=True)
    try:
        return _run_in_session(context, command, cwd, env, termination_timeout_s, channel)
    finally:
        shutil.rmtree(channel, ignore_errors=True)


def _run_in_session(context: dg.AssetExecutionContext, command: list[str], cwd: str, env: dict[str, str],
                    termination_timeout_s: float, channel: Path) -> Outcome:
    with dg.open_pipes_session(context=context,
                               context_injector=dg.PipesFileContextInjector(str(channel / "context.json")),
                               message_reader=dg.PipesFileMessageReader(str(channel / "messages.jsonl"))) as session:
        relay = Relay(context, session)
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, **env, **session.get_bootstrap_env_vars()})
        try:
            while proc.poll() is None:
                relay.drain()
                time.sleep(POLL_S)
        except DagsterExecutionInterruptedError:
            context.log.info("[pipes] execution interrupted, sending SIGINT to the command")
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=termination_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    relay.drain()  # the session is closed: every message the stage wrote has been read
    metadata: dict[str, dg.MetadataValue] = {}
    for item in session.get_reported_results():
        if isinstance(item, dg.MaterializeResult) and item.metadata:
            metadata.update(item.metadata)
    return Outcome(proc.returncode, metadata, relay.error, relay.progress)
