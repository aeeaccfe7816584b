"""python -m team up|down|status|env|remote [--root DIR]: the team stack of a project (default: this repo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from team import checkpoints, stack
from team.settings import SettingError, Team

COMMANDS = {
    "up": "start Postgres, S3, the MLflow server, Dagster's daemon and webserver (team.env's services)",
    "down": "stop them",
    "status": "say what is up (exit code 1 when something is down)",
    "env": "print the exports a shell needs: eval \"$(python -m team env)\"",
    "remote": "make the S3 bucket this clone's default DVC remote (.dvc/config.local)",
    "checkpoints-push": "upload artifacts/checkpoints/ to NANOFORGE_CHECKPOINTS_URL (not a DVC output)",
    "checkpoints-pull": "download them into a clone, so training resumes there",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m team", description=__doc__)
    parser.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]),
                        help="the project (its workspace.yaml, .dvc/); default: this repo")
    args = parser.parse_args(argv)
    try:
        team = Team.load(args.root)
        if args.command == "up":
            stack.up(team)
        elif args.command == "down":
            stack.down(team)
        elif args.command == "status":
            return stack.status(team)
        elif args.command == "env":
            print("\n".join(stack.env_lines(team)))
        elif args.command == "remote":
            stack.remote(team)
        elif args.command == "checkpoints-push":
            print(f"team: {checkpoints.push(team, team.root)}")
        else:
            print(f"team: {checkpoints.pull(team, team.root)}")
    except (SettingError, RuntimeError) as exc:
        print(f"team {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
