"""A team overlay with a data bucket, written into a temporary folder: the repo's teams have none, and a team
that wants one changes two files (its team-config and its overlay), which is what this writes."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPACITY = {"team-vision": "spot", "team-research": "on-demand"}


def write_bucket_overlay(root: Path, team: str = "team-vision", bucket: str | None = "vision-data",
                         component: bool = True) -> Path:
    """root/team: the repo's team with dataBucket set (or left out when bucket is None); root/overlay: that team
    with the components of kustomize/overlays/<team>, plus components/data-bucket when `component`.
    kustomize refuses absolute paths, hence the relative ones."""
    team_dir, overlay = root / "team", root / "overlay"
    team_dir.mkdir(parents=True, exist_ok=True)
    overlay.mkdir(parents=True, exist_ok=True)
    repo = Path(os.path.relpath(REPO, team_dir))
    patch = "" if bucket is None else f"""patches:
  - patch: |-
      apiVersion: v1
      kind: ConfigMap
      metadata: {{name: team-config, namespace: {team}}}
      data: {{dataBucket: "{bucket}"}}
"""
    (team_dir / "kustomization.yaml").write_text(f"resources:\n  - {repo}/kustomize/teams/{team}\n{patch}")
    components = [f"{repo}/kustomize/components/{CAPACITY[team]}", f"{repo}/kustomize/components/team-wiring",
                  f"{repo}/kustomize/components/monitoring"]
    if component:
        components.append(f"{repo}/kustomize/components/data-bucket")
    (overlay / "kustomization.yaml").write_text(
        "resources:\n  - ../team\ncomponents:\n" + "".join(f"  - {c}\n" for c in components))
    return overlay
