"""The few Dagster GraphQL calls the team tests make against the webserver (what the UI sends)."""

from __future__ import annotations

import time

import requests

LOCATION, REPOSITORY = "nanoforge", "__repository__"
DONE = {"SUCCESS", "FAILURE", "CANCELED"}


class Dagster:
    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/graphql"

    def query(self, text: str, **variables) -> dict:
        response = requests.post(self.url, json={"query": text, "variables": variables}, timeout=60)
        body = response.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def runs(self) -> list[dict]:
        data = self.query("""{ runsOrError(limit: 50) { ... on Runs { results {
            runId jobName status startTime endTime creationTime tags { key value } } } } }""")
        out = data["runsOrError"]["results"]
        for run in out:
            run["tags"] = {t["key"]: t["value"] for t in run["tags"]}
        return out

    def submit(self, job: str) -> str:
        data = self.query("""mutation($job: String!, $loc: String!, $repo: String!) {
            launchRun(executionParams: {selector: {repositoryLocationName: $loc, repositoryName: $repo,
                                                   jobName: $job}, runConfigData: "{}"}) {
              __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                          job=job, loc=LOCATION, repo=REPOSITORY)
        result = data["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return result["run"]["runId"]

    def _selector(self, kind: str, name: str) -> dict:
        return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, f"{kind}Name": name}

    def sensor_ticks(self, name: str) -> list[dict]:
        data = self.query("""query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {
            ... on Sensor { sensorState { ticks(limit: 10) { status timestamp } } } } }""",
                          s=self._selector("sensor", name))
        return data["sensorOrError"]["sensorState"]["ticks"]

    def stop_schedule(self, name: str) -> str:
        data = self.query("""query($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) {
            ... on Schedule { id } } }""", s=self._selector("schedule", name))
        data = self.query("""mutation($id: String!) { stopRunningSchedule(id: $id) {
            __typename ... on ScheduleStateResult { scheduleState { status } } } }""",
                          id=data["scheduleOrError"]["id"])
        return data["stopRunningSchedule"]["scheduleState"]["status"]

    def wait(self, predicate, timeout: float, what: str, every: float = 2.0):
        """Poll the run list until `predicate(runs)` returns something truthy; fail saying `what`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.runs()
            found = predicate(runs)
            if found:
                return found
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; runs: "
                             f"{[(r['jobName'], r['status'], r['tags'].get('nanoforge/trigger')) for r in self.runs()]}")
