"""Team mode: the pipeline on shared servers (PostgreSQL, S3, an MLflow server, Dagster's webserver
and daemon), started and stopped by `python -m team up|down|status` (`make team-up` ...).

Settings: team/team.env. Files: settings.py (the env file), procs.py (detached processes),
postgres.py, services.py (S3, MLflow, Dagster), stack.py (all of them together).
"""
