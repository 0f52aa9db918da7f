"""team-data-bucket: the team-config's dataBucket, which decides whether prepare-data and evaluate mount it."""
from kfp import dsl

from pipelines.kfp_pipeline.components import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def team_data_bucket(backend: str) -> str:
    """The team's data bucket ("" = none): on the cluster from the team-config env, locally from the team-config
    file the demo was given (or none)."""
    from pipelines.kfp_pipeline.steps.train import team_config

    return team_config(backend).data_bucket
