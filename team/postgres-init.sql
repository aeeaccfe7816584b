-- docker-compose.yml's Postgres: the two databases team mode uses (team up creates them itself)
CREATE DATABASE mlflow;
CREATE DATABASE dagster;
