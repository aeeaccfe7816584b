"""The end of the pipeline: `dvc_remote`, the DVC remote holding data/ and every cached stage output.

Notable:
- Runs `dvc push`; its data version is the hash of dvc.lock and data.dvc, so it is
  unsynced exactly when there is something new to push.
- Only in the nightly `retrain` job (pipeline.push_to_remote), not in `pipeline`
  (what `make demo` and the inputs sensor run): a push belongs after the run is
  committed to git. `dvc status --cloud` agrees with it afterwards.
"""

import configparser
import hashlib
import re
from pathlib import Path

import dagster as dg

from pipelines.defs.resources import DvcResource, MlflowResource
from pipelines.defs.step import DEFAULT_OWNERS, POOL, Step
from pipelines.project import DOWNLOAD, REMOTE, Project


def remote_url(root: Path) -> str | None:
    parser = configparser.ConfigParser()
    parser.read([root / ".dvc/config", root / ".dvc/config.local"])
    name = parser.get("core", "remote", fallback=None)
    if not name:
        return None
    return parser.get(f"'remote \"{name}\"'", "url", fallback=None) or parser.get(f'remote "{name}"', "url", fallback=None)


def remote_asset(project: Project) -> dg.AssetsDefinition:
    @dg.asset(
        key=REMOTE,
        deps=[dg.AssetKey(DOWNLOAD), *(dg.AssetKey(n) for n in project.stage_assets)],
        group_name="publish",
        kinds={"dvc"},
        owners=list(DEFAULT_OWNERS),
        description="`dvc push`: the DVC remote holds data/ and every cached stage output of this dvc.lock, so "
                    "`git checkout <commit> && dvc pull` brings this run back anywhere.",
        pool=POOL,
    )
    def dvc_remote(context: dg.AssetExecutionContext, dvc: DvcResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        step = Step(context, project, mlflow)
        try:
            result, _ = dvc.run(context, ["push"], step.env())
        except BaseException as exc:
            step.failed(exc)
            raise
        tail = result.get("output_tail", "")
        pushed = re.search(r"(\d+) files? pushed", tail)
        digest = hashlib.sha256(b"".join((project.root / f).read_bytes() for f in ("dvc.lock", "data.dvc")
                                          if (project.root / f).exists())).hexdigest()[:16]
        step.done([], REMOTE, result)
        return dg.MaterializeResult(data_version=dg.DataVersion(digest), metadata={
            "remote": dg.MetadataValue.text(remote_url(project.root) or "(default remote)"),
            "files_pushed": dg.MetadataValue.int(int(pushed.group(1)) if pushed else 0),
            "dvc_status": dg.MetadataValue.text("everything was already on the remote" if not pushed else "pushed"),
            "duration_s": dg.MetadataValue.float(float(result.get("seconds") or 0.0)),
        })

    return dvc_remote


def defs(project: Project) -> dg.Definitions:
    return dg.Definitions(assets=[remote_asset(project)])
