"""`arrcoc image`: build the trainer image (trainer/Dockerfile) with podman, or make its build context for another
builder (the CUDA image's workflow). `make image` runs `arrcoc image build`.

The context holds only `wheelhouse/`: constraints.txt, requirements.txt, a wheel of every pinned runtime dependency
(made with this machine's pip, cached per constraints.txt and pyproject.toml) and this checkout's own wheel (built
fresh from the files git tracks or would track). The Dockerfile installs from it with --no-index, so the image
holds exactly the pins, whatever the build machine reaches. On the Debian base torch is the CPU wheel; on the
CUDA base torch is left out of the wheelhouse and the base's own build is used.

The Debian base is made here: `debootstrap --variant=minbase bookworm` with Python 3.11 and pip, imported into
podman as localhost/arrcoc-base:bookworm-<hash of how it is made>, and reused while that image exists.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from pipelines.image import podman
from pipelines.jobs.pytorchjob import DEFAULT_IMAGE
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer" / "Dockerfile"
CACHE = REPO / ".arrcoc" / "image"  # git-ignored: wheels and build contexts
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
VERSION = PROJECT["version"]
LOCAL_IMAGE = f"localhost/arrcoc-trainer:{VERSION}"
BASES = ("debian", "cuda")
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Python 3.11 (bookworm's, as the project's) with pip; `python` on PATH as in the CUDA base; passwd for useradd.
DEBIAN_PACKAGES = ("python3", "python3-pip", "python-is-python3", "passwd", "ca-certificates")


class ImageError(UserError):
    """A bad `arrcoc image` choice: one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,context}")
    build = sub.add_parser("build", help=f"build {LOCAL_IMAGE} (also tagged {DEFAULT_IMAGE}) with podman")
    build.add_argument("--base", default="debian",
                       help="debian (the project's own, made here; default) or an image podman already holds")
    build.add_argument("--no-cache", action="store_true", help="rebuild every layer (the base and wheels stay cached)")
    context = sub.add_parser("context", help="make the build context for another builder (docker buildx)")
    context.add_argument("--base", choices=BASES, default="cuda", help="which base the wheelhouse is for")
    context.add_argument("--dir", required=True, help="the folder to write (replaced)")


def run(args: argparse.Namespace) -> int:
    if args.action == "context":
        directory = make_context(Path(args.dir), cuda=args.base == "cuda")
        print(f"arrcoc image: build context for the {args.base} base in {directory}")
        return 0
    result = build(base=args.base, no_cache=args.no_cache)
    print(f"arrcoc image: built {LOCAL_IMAGE} (and {DEFAULT_IMAGE}) on {result['base']}: "
          f"{result['size'] / 1e9:.2f} GB in {result['seconds']:.0f} s (base {result['base_seconds']:.0f} s, "
          f"wheelhouse {result['wheel_seconds']:.0f} s, podman build {result['build_seconds']:.0f} s)")
    return 0


def build(base: str = "debian", no_cache: bool = False, out=sys.stderr) -> dict:
    """Build the image; returns its size (bytes) and the seconds each part took."""
    podman.require("podman", *(["debootstrap"] if base == "debian" else []))
    started = time.monotonic()
    base_ref = debian_base(out) if base == "debian" else base
    if base != "debian" and not podman.image_exists(base):
        raise ImageError(f"--base {base}: podman holds no such image (nothing is pulled here); use debian")
    base_done = time.monotonic()
    context = make_context(CACHE / "context", cuda=False, out=out)
    wheels_done = time.monotonic()
    previous = _image_id(LOCAL_IMAGE)
    command = ["build", "-f", str(DOCKERFILE), "--build-arg", f"BASE={base_ref}",
               "--build-arg", f"DEPENDENCIES_DIGEST={dependencies_digest()}",
               "--build-arg", f"SOURCE_DIGEST={source_digest()}", "-t", LOCAL_IMAGE,
               "-t", DEFAULT_IMAGE, *(["--no-cache"] if no_cache else []), str(context)]
    result = subprocess.run(["podman", *command], env=podman.environ(), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"podman build failed (exit {result.returncode}); its output is above")
    built = _image_id(LOCAL_IMAGE)
    done = time.monotonic()
    if previous and previous != built:  # the image this build replaced is dangling now: drop it (not timed)
        podman.podman("rmi", previous, check=False)
    return {"base": base_ref, "size": podman.image_size(LOCAL_IMAGE), "seconds": done - started,
            "base_seconds": base_done - started, "wheel_seconds": wheels_done - base_done,
            "build_seconds": done - wheels_done, "image_id": built}


def source_digest() -> str:
    """sha256 of everything the image's Python files come from: the Dockerfile, the pins, and each file of the
    project's wheel (pyproject.toml, README.md, trainer/, pipelines/) that git tracks or would track."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                             "pyproject.toml", "README.md", "constraints.txt", "trainer", "pipelines"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    digest = hashlib.sha256()
    for name in sorted(filter(None, listed)):
        if (REPO / name).is_file():
            digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()


def image_digest_label(ref: str = LOCAL_IMAGE) -> str | None:
    """The source digest the image `ref` was built from (None: no such image)."""
    result = podman.podman("image", "inspect", "--format", '{{index .Labels "dev.arrcoc.source-digest"}}', ref,
                           check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def debian_base(out=sys.stderr) -> str:
    """The Debian base's reference, made (debootstrap, about a minute) and imported when podman lacks it."""
    recipe = f"{DEBIAN_SUITE} minbase {' '.join(DEBIAN_PACKAGES)} {DEBIAN_MIRROR}"
    ref = f"localhost/arrcoc-base:{DEBIAN_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if podman.image_exists(ref):
        return ref
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"arrcoc image: debootstrap {DEBIAN_SUITE} into {rootfs} (once; then podman keeps {ref})", file=out)
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}", DEBIAN_SUITE,
                        str(rootfs), DEBIAN_MIRROR], check=True, stdout=out, stderr=subprocess.STDOUT)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        # The image is the environment: pip installs into its Python, as into the CUDA base's (PEP 668's marker
        # is Debian's guard for a system shared with apt, which this image never runs).
        for marker in (rootfs / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", ref], stdin=tar.stdout, env=podman.environ(),
                                  capture_output=True, text=True)
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"podman import of the debootstrap base failed: {imported.stderr.strip()[-300:]}")
    return ref


def make_context(directory: Path, *, cuda: bool, out=sys.stderr) -> Path:
    """directory/wheelhouse: constraints.txt, requirements.txt (pyproject's runtime dependencies), the pinned
    runtime wheels (torch: the CPU wheel, or none for the CUDA base) and this checkout's wheel."""
    deps = _dependency_wheels(out)
    torch = [w for w in deps.glob("torch-*.whl")]
    if not cuda and not any("+cpu" in w.name for w in torch):
        raise ImageError(f"the wheelhouse's torch is {[w.name for w in torch]}, not the CPU wheel: install "
                         f"torch=={_pin('torch')} from the CPU index first (PIP_EXTRA_INDEX_URL)")
    wheelhouse = directory / "wheelhouse"
    if directory.exists():
        shutil.rmtree(directory)
    wheelhouse.mkdir(parents=True)
    for wheel in deps.glob("*.whl"):
        if cuda and wheel.name.startswith("torch-"):
            continue
        os.link(wheel, wheelhouse / wheel.name)
    shutil.copyfile(REPO / "constraints.txt", wheelhouse / "constraints.txt")
    (wheelhouse / "requirements.txt").write_text("\n".join(PROJECT["dependencies"]) + "\n")
    _project_wheel(wheelhouse, out)
    return directory


def _pin(name: str) -> str:
    for dep in PROJECT["dependencies"]:
        if dep.split("==")[0] == name:
            return dep.split("==")[1]
    raise ImageError(f"pyproject.toml does not pin {name}")


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def dependencies_digest() -> str:
    """sha256 of what decides the dependency wheels: constraints.txt and pyproject's runtime dependencies."""
    return hashlib.sha256((REPO / "constraints.txt").read_bytes()
                          + "\n".join(PROJECT["dependencies"]).encode()).hexdigest()


def _dependency_wheels(out) -> Path:
    """Wheels of the runtime dependencies at their pins, cached under a hash of what decides them."""
    key = dependencies_digest()[:12]
    cache = CACHE / f"wheels-{key}"
    if (cache / "COMPLETE").is_file():
        return cache
    staging = CACHE / f".wheels-{key}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"arrcoc image: pip wheel of the pinned runtime dependencies into {cache}", file=out)
    subprocess.run([*_pip(), "wheel", "-q", "-w", str(staging), "-c", str(REPO / "constraints.txt"),
                    *PROJECT["dependencies"]], check=True, stdout=out, stderr=subprocess.STDOUT)
    (staging / "COMPLETE").write_text("")
    shutil.rmtree(cache, ignore_errors=True)
    staging.rename(cache)
    return cache


def _project_wheel(wheelhouse: Path, out) -> None:
    """This checkout's wheel, from a copy of the files git tracks or would track (no stale build/ leftovers)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="src-") as tmp:
        for name in filter(None, files):
            source = REPO / name
            if source.is_file():
                target = Path(tmp) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        subprocess.run([*_pip(), "wheel", "-q", "--no-deps", "-w", str(wheelhouse), tmp], check=True, stdout=out,
                       stderr=subprocess.STDOUT)


def _image_id(ref: str) -> str | None:
    result = podman.podman("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    return result.stdout.strip() if result.returncode == 0 else None
