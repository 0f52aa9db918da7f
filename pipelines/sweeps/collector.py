"""What Katib v0.19 does to a trial's primary container, and what the kubelet then runs.

Katib's pod webhook (kubeflow/katib v0.19.0 pkg/webhook/v1beta1/pod/inject_webhook.go Mutate -> utils.go
wrapWorkerContainer) rewrites the primary container of the primary pod for the StdOut, File and TensorFlowEvent
collectors into `sh -c "<command> <args> 1>/var/log/katib/metrics.log 2>&1 [|| <early-stopping test>] && echo
completed > /var/log/katib/$$$$.pid"` (command and args joined with single spaces). The kubelet expands
`$(VAR)` references and reduces `$$` to `$` in command and args before it starts the container
(kubernetes third_party/forked/golang/expansion/expand.go, Expand and tryReadVariableName), so the shell sees
`$$.pid` (its own pid) where Katib wrote `$$$$.pid`. Inside the early-stopping test's `$(head -n 1 $$.pid)` the
kubelet reads `head -n 1 $$.pid` as the name of an unset variable and leaves the whole reference as it is, so the
shell sees `$$.pid` there too (Katib's comment in getEarlyStoppingCommand relies on this).

`wrap_primary_container` gives the container as the webhook leaves it; `kubelet_expand` is the kubelet's
expansion. The image tests and the local sweep run the result, so they run what a trial pod runs.
"""
from __future__ import annotations

import copy
import posixpath
from collections.abc import Mapping
from typing import Any

# pkg/apis/controller/common/v1beta1/common_types.go DefaultFilePath
METRICS_FILE = "/var/log/katib/metrics.log"
# pkg/metricscollector/v1beta1/common/const.go TrainingCompleted, TrainingEarlyStopped
TRAINING_COMPLETED = "completed"
TRAINING_EARLY_STOPPED = "early-stopped"
# pkg/webhook/v1beta1/pod/const.go NeedWrapWorkerMetricsCollectorList
WRAPPED_COLLECTORS = ("StdOut", "TensorFlowEvent", "File")


class CollectorError(ValueError):
    """A container the webhook could not wrap."""


def wrap_primary_container(container: Mapping[str, Any], *, collector: str = "StdOut", early_stopping: bool = False,
                           metrics_path: str = METRICS_FILE, path_is_file: bool = True) -> dict[str, Any]:
    """The primary container after Katib's webhook: command ["sh", "-c"] and one arg (utils.go wrapWorkerContainer).

    metrics_path is getMountPath's answer: the metrics file for StdOut (DefaultFilePath) and File collectors, a
    directory for TensorFlowEvent (path_is_file False). early_stopping: the Trial has earlyStoppingRules.
    """
    if collector not in WRAPPED_COLLECTORS:
        return copy.deepcopy(dict(container))
    command = list(container.get("command") or [])
    if not command:
        # getContainerCommand would read the image's ENTRYPOINT from the registry; our manifests always name it.
        raise CollectorError(f"container {container.get('name')!r} has no command: Katib would read the image's "
                             f"ENTRYPOINT, which this rehearsal cannot; name the command in the manifest")
    args = command + list(container.get("args") or [])
    shell = ["sh", "-c"]
    if args[0] in ("sh", "bash") and len(args) > 1 and args[1] == "-c":  # "If the first two commands are sh -c"
        shell, args = args[:2], args[2:]
    if collector == "StdOut":
        args.append(f"1>{metrics_path} 2>&1")
    directory = posixpath.dirname(metrics_path) if path_is_file else metrics_path
    if early_stopping:  # getEarlyStoppingCommand
        args += ["||", f"if test -f {posixpath.join(directory, '$$$$.pid')} && "
                       f"[ $(head -n 1 {posixpath.join(directory, '$$.pid')}) = {TRAINING_EARLY_STOPPED} ]; "
                       f"then echo Training Container was Early Stopped; "
                       f"else echo Training Container was Failed; exit 1; fi"]
    args += ["&&", f"echo {TRAINING_COMPLETED} > {posixpath.join(directory, '$$$$.pid')}"]  # getMarkCompletedCommand
    wrapped = copy.deepcopy(dict(container))
    wrapped["command"] = shell
    wrapped["args"] = [" ".join(args)]
    return wrapped


def kubelet_expand(text: str, env: Mapping[str, str]) -> str:
    """The kubelet's expansion of a command or arg: `$(NAME)` becomes env[NAME] (left as `$(NAME)` when unset),
    `$$` becomes `$`, any other `$` stays."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$" or i + 1 == len(text):
            out.append(text[i])
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(" and ")" in text[i + 2:]:
            end = text.index(")", i + 2)
            name = text[i + 2:end]
            out.append(env[name] if name in env else f"$({name})")
            i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)
