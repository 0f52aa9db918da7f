"""`python -m pipelines.validation.crds download [DIR]`: fetch the upstream CRDs and schemas `arrcoc validate`
reads, at pinned commits, and check them against the sha256 list below.
`python -m pipelines.validation.crds verify [DIR]` checks an existing directory.
Nothing is written unless every file downloads and matches: files land in a temporary directory
inside DIR and are renamed into place at the end; a directory that already matches is left as is.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipelines.validation.run import crd_dir


@dataclass(frozen=True)
class PinnedFile:
    local: str  # path inside the CRD directory
    repo: str
    commit: str
    path: str  # path inside the repository

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.path}"


def _config_connector(resource: str) -> PinnedFile:
    """A Config Connector v1.155.1 CRD (GKE's add-on for Google Cloud resources as Kubernetes objects: manifests/gcp),
    e.g. resource "storagebuckets.storage"."""
    name = f"{resource}.cnrm.cloud.google.com.yaml"
    return PinnedFile(f"config-connector-v1.155.1/{name}", "GoogleCloudPlatform/k8s-config-connector",
                      "033afecec0b66d43ca04d9bfc20b43e4453c2a09",
                      f"config/crds/resources/apiextensions.k8s.io_v1_customresourcedefinition_{name}")


FILES = (
    _config_connector("artifactregistryrepositories.artifactregistry"),
    _config_connector("computefirewalls.compute"),
    _config_connector("computenetworks.compute"),
    _config_connector("containerclusters.container"),
    _config_connector("containernodepools.container"),
    _config_connector("filestoreinstances.filestore"),
    _config_connector("iampartialpolicies.iam"),
    _config_connector("iampolicymembers.iam"),
    _config_connector("iamserviceaccounts.iam"),
    _config_connector("storagebuckets.storage"),
    # Google Cloud Managed Service for Prometheus (GKE's managed collection): PodMonitoring, Rules and their kin.
    *(PinnedFile(f"gmp-v0.17.2/{name}", "GoogleCloudPlatform/prometheus-engine",
                 "7920a2a222af1c09535d8141684e2944670c5041", f"charts/operator/crds/{name}")
      for name in (f"monitoring.googleapis.com_{kind}.yaml" for kind in (
          "clusterpodmonitorings", "clusterrules", "globalrules", "operatorconfigs", "podmonitorings", "rules"))),
    PinnedFile("katib-v0.19.0/experiment.yaml", "kubeflow/katib", "578e60f1ce83dbb5e7151026a3bdc4de233947fc",
               "manifests/v1beta1/components/crd/experiment.yaml"),
    PinnedFile("katib-v0.19.0/suggestion.yaml", "kubeflow/katib", "578e60f1ce83dbb5e7151026a3bdc4de233947fc",
               "manifests/v1beta1/components/crd/suggestion.yaml"),
    PinnedFile("katib-v0.19.0/swagger.json", "kubeflow/katib", "578e60f1ce83dbb5e7151026a3bdc4de233947fc",
               "pkg/apis/v1beta1/swagger.json"),
    PinnedFile("katib-v0.19.0/trial.yaml", "kubeflow/katib", "578e60f1ce83dbb5e7151026a3bdc4de233947fc",
               "manifests/v1beta1/components/crd/trial.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_admissionchecks.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_admissionchecks.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_clusterqueues.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_clusterqueues.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_cohorts.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb", "config/components/crd/bases/kueue.x-k8s.io_cohorts.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_localqueues.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_localqueues.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_resourceflavors.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_resourceflavors.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_topologies.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_topologies.yaml"),
    PinnedFile("kueue-v0.19.2/kueue.x-k8s.io_workloadpriorityclasses.yaml", "kubernetes-sigs/kueue",
               "8eab68778fc1b52affe165fdf5af29d1e9b4f3cb",
               "config/components/crd/bases/kueue.x-k8s.io_workloadpriorityclasses.yaml"),
    PinnedFile("profiles-manifests-26.03/kubeflow.org_profiles.yaml", "kubeflow/manifests",
               "d68ebc7fab366ab40ddd1541d2ec22febb31bc83",
               "applications/profiles/upstream/crd/bases/kubeflow.org_profiles.yaml"),
    PinnedFile("trainer-v2.1.0/trainer.kubeflow.org_clustertrainingruntimes.yaml", "kubeflow/trainer",
               "73c9bece741ce17d2124abda3ec6bfcf5b5b8e87",
               "manifests/base/crds/trainer.kubeflow.org_clustertrainingruntimes.yaml"),
    PinnedFile("trainer-v2.1.0/trainer.kubeflow.org_trainingruntimes.yaml", "kubeflow/trainer",
               "73c9bece741ce17d2124abda3ec6bfcf5b5b8e87",
               "manifests/base/crds/trainer.kubeflow.org_trainingruntimes.yaml"),
    PinnedFile("trainer-v2.1.0/trainer.kubeflow.org_trainjobs.yaml", "kubeflow/trainer",
               "73c9bece741ce17d2124abda3ec6bfcf5b5b8e87", "manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml"),
    PinnedFile("training-operator-v1.9.2/kubeflow.org_pytorchjobs.yaml", "kubeflow/trainer",
               "bde9c20903ad9b54af1f3883e4fa764a3c0db797", "manifests/base/crds/kubeflow.org_pytorchjobs.yaml"),
)

SHA256SUMS = """\
100fb9afb9352795e5bbcb64262617a19ae813a09e96139a575a0964db8bbd29  ./config-connector-v1.155.1/artifactregistryrepositories.artifactregistry.cnrm.cloud.google.com.yaml
eba41244f5a40685d99284ab129bf6566d1a772e58261506dc771adcda2dd935  ./config-connector-v1.155.1/computefirewalls.compute.cnrm.cloud.google.com.yaml
324e3c2c40234b55f2b835f27d4ff07658d0be562defc470527146240b4015cf  ./config-connector-v1.155.1/computenetworks.compute.cnrm.cloud.google.com.yaml
b84bd526ede46a337d92d3e5d176aa41b20b56e9b171321162b00983914dc0de  ./config-connector-v1.155.1/containerclusters.container.cnrm.cloud.google.com.yaml
b1e3ed69ced9972db8cd57c01401687fa625985305260fcc9d0a472db912e55c  ./config-connector-v1.155.1/containernodepools.container.cnrm.cloud.google.com.yaml
477b38b2b849e9354f17a59d49a97925bfc28b82d1dec0fc53f2f89028f8ba05  ./config-connector-v1.155.1/filestoreinstances.filestore.cnrm.cloud.google.com.yaml
5ea0bb77cd72c573e240d0b42314407a43e559532da466c64e67ea4290650d2e  ./config-connector-v1.155.1/iampartialpolicies.iam.cnrm.cloud.google.com.yaml
3857b636b797d04c66d5b8e3ab638ec0671a6c784a2dc4c96817a58573195d29  ./config-connector-v1.155.1/iampolicymembers.iam.cnrm.cloud.google.com.yaml
6f6bc2a8529bd4614ac6e119ee2c5ed5b4040cf54bc37ff5fc00eb6042be7f44  ./config-connector-v1.155.1/iamserviceaccounts.iam.cnrm.cloud.google.com.yaml
70250a86db6e1206aedf9c059caeec2e011900d3632f4984a6924eb96a773462  ./config-connector-v1.155.1/storagebuckets.storage.cnrm.cloud.google.com.yaml
9bc1857ded418ef5de06bffa47020d68b2e00eac0f8867ac83a88e16a87bbc28  ./gmp-v0.17.2/monitoring.googleapis.com_clusterpodmonitorings.yaml
5b4aa205ec50844b3e0f6ee2862bccc322757b73345eaef15615db52a07c57e2  ./gmp-v0.17.2/monitoring.googleapis.com_clusterrules.yaml
88806ad36451409b074a3c5a8d9d3f1625268a0e96df45a9a51eb346a5e7c40f  ./gmp-v0.17.2/monitoring.googleapis.com_globalrules.yaml
3f654474c72606b85989590f454cced798c565799accacc103bc9f082cce5a99  ./gmp-v0.17.2/monitoring.googleapis.com_operatorconfigs.yaml
d344029bc7754e0254d7c253db9d6400b344d5837e121b42790946757bc79f1f  ./gmp-v0.17.2/monitoring.googleapis.com_podmonitorings.yaml
49c2cfea8d228a96c466ac49c09f4c19f6cb51ebdd258011cb364a97cb24afee  ./gmp-v0.17.2/monitoring.googleapis.com_rules.yaml
c7f8a989368dcc87bcbb2739efa3b3e6f78d31f156857e0284e56c8bd6bf98db  ./katib-v0.19.0/experiment.yaml
779b50ccf5a60da5e79bac8ff37a0f1adbecfb77b366645d1db79709c6eb2922  ./katib-v0.19.0/suggestion.yaml
fe7228f8735d8e024ee99a1080ca9851b0a8e34c7b49f402e4cb54bfbe13f45a  ./katib-v0.19.0/swagger.json
207d14cdfad2921ccebf4aba97c1e55bd238dd2a16e4e7f49cedcba046b6c3cf  ./katib-v0.19.0/trial.yaml
2bf4003c0a3ea3d6ceab940c7a271ad211372dab59d2739acfa8b2bdb0724acb  ./kueue-v0.19.2/kueue.x-k8s.io_admissionchecks.yaml
e0a5fc9b370c70f3d993d4f599865817338ecf94187b30b15b12ff33c579bd55  ./kueue-v0.19.2/kueue.x-k8s.io_clusterqueues.yaml
61fbe5ec55d45e7fae2d65321fb32517b197257ab78ad55316673183aac911c2  ./kueue-v0.19.2/kueue.x-k8s.io_cohorts.yaml
dd10ef8d3578e7212fa52763549e7b6be0949793a5b924495fcd293330109fed  ./kueue-v0.19.2/kueue.x-k8s.io_localqueues.yaml
19e339c47e9ca3fa2c9eeddd27715a512f765c4794ed859733408a9715720173  ./kueue-v0.19.2/kueue.x-k8s.io_resourceflavors.yaml
f703575d3bb64d26f6e839f831e01646367ed41a89b3abf163f8e842ca1c4d2b  ./kueue-v0.19.2/kueue.x-k8s.io_topologies.yaml
0b755726aab05b8def9a53ee15b201eed3846bcffd1ff5528fed123f4ae03519  ./kueue-v0.19.2/kueue.x-k8s.io_workloadpriorityclasses.yaml
d661b57824481b715aa7589b8e72aa695a7767c449880272bc2aa5f398f8eeac  ./profiles-manifests-26.03/kubeflow.org_profiles.yaml
be1a629914db7bef3b4f864be82a0bfcb7ab5fb8e2fd58542de024b9f5f559f0  ./trainer-v2.1.0/trainer.kubeflow.org_clustertrainingruntimes.yaml
bcf07e6094259d389a00d84013e7723b975570373ee00f07dc5faec7b002f155  ./trainer-v2.1.0/trainer.kubeflow.org_trainingruntimes.yaml
65ea8f95f298103275e00b690bda5e090355f7eb5d6e4d15236b557f088b8078  ./trainer-v2.1.0/trainer.kubeflow.org_trainjobs.yaml
eb80e57a984cdc7ceefaaf3fc561e21b673c30cbb58589f2389528d2b2760d22  ./training-operator-v1.9.2/kubeflow.org_pytorchjobs.yaml
"""  # noqa: E501  (sha256sum's own format: one digest and path per line)


class CrdError(RuntimeError):
    exit_code = 1


def expected_sums(text: str = SHA256SUMS) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        if line.strip():
            digest, name = line.split()
            sums[name.removeprefix("./")] = digest
    return sums


def verify(directory: Path, sums: dict[str, str] | None = None) -> list[str]:
    """One line per file that is missing or whose sha256 differs; empty when all match."""
    problems = []
    for name, digest in sorted((sums or expected_sums()).items()):
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != digest:
            problems.append(f"{path}: sha256 {actual} does not match the pinned {digest}")
    return problems


def download(directory: Path, timeout: float = 60.0) -> None:
    if not verify(directory):
        return  # already complete: nothing to fetch
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".crds-", dir=directory))
    try:
        for pinned in FILES:
            target = staging / pinned.local
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(pinned.url, timeout=timeout) as response:
                target.write_bytes(response.read())
        problems = verify(staging)
        if problems:
            raise CrdError("; ".join(problems))
        (staging / "SHA256SUMS").write_text(SHA256SUMS)
        # Same filesystem, so each file appears whole; other files in the directory are left alone.
        for name in [*expected_sums(), "SHA256SUMS"]:
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.validation.crds", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("download", "verify"))
    parser.add_argument("directory", nargs="?", type=Path,
                        help="default: $ARRCOC_CRD_DIR or .arrcoc/crds in the checkout")
    args = parser.parse_args(argv)
    directory = args.directory or crd_dir()
    try:
        if args.action == "download":
            download(directory)
        problems = verify(directory)
    except (OSError, CrdError) as error:
        print(f"crds: error: {error}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"crds: {problem}", file=sys.stderr)
    if not problems:
        print(f"crds: {len(FILES)} files in {directory} match their pinned sha256")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
