"""The trainer image on this machine: its build (`arrcoc image`, build.py) and podman running a pod's container the
way the kubelet would (podman.py). docs/image.md."""
