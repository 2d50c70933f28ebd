"""The CPU image really built and run, with podman: docker/Dockerfile.cpu built (its layer cache reused), an index
built inside a container from the demo photos into a named volume (as docker/compose.yaml does), a second
container serving it with its port published on the host's 127.0.0.1 and an API key, a text search through that
port answered with the cat photo first, and the image's HEALTHCHECK passing. Slow; skipped, with the reason,
where podman or a base image is missing (docs/deployment.md says how to make one without a registry).

Settings (environment): ALIGNSEARCH_DOCKER_BASE, the base image (default: localhost/alignsearch-base:bookworm if
podman has it, else python:3.11-slim if it has that); ALIGNSEARCH_PODMAN_BUILD_ARGS, extra `podman build`
options (default: the host's pip index, find-links and CA bundle, see ``host_pip_options``)."""

from __future__ import annotations

import json
import os
import resource
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from alignsearch.service.demo import DEMO_CAPTIONS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
IMAGE = "localhost/alignsearch:cpu-test"
BASES = ("localhost/alignsearch-base:bookworm", "docker.io/library/python:3.11-slim")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
TORCH = "torch-2.13.0+cpu-"  # the CPU wheel's file name starts so


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {shlex.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def has_image(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


NPROC = 32768  # a process limit runc may set in a container where the host's own (higher) one is refused


def run_options() -> list[str]:
    """Options for every container, build steps included: runc where it is installed (crun refuses hybrid
    cgroups), and file and process limits no higher than the host's (podman's defaults may be higher than the
    host allows, and the container then fails to start)."""
    options = ["--runtime", "runc"] if shutil.which("runc") else []
    for name, limit, cap in (("nofile", resource.RLIMIT_NOFILE, None), ("nproc", resource.RLIMIT_NPROC, NPROC)):
        hard = resource.getrlimit(limit)[1]
        hard = cap if hard == resource.RLIM_INFINITY else min(hard, cap or hard)
        if hard != resource.RLIM_INFINITY:
            options += ["--ulimit", f"{name}={hard}:{hard}"]
    return options


def pip_config() -> dict[str, str]:
    """The host's pip settings (`pip config list`: files and PIP_* variables), by key (index-url, find-links...)."""
    result = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    settings: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition("=")
        settings[key.rpartition(".")[2]] = value.strip().strip("'\"")
    return settings


def host_pip_options() -> list[str]:
    """`podman build` options that give the build the host's pip set-up: its index (a mirror), its extra
    indexes and find-links (local ones mounted read-only at the same path), and its CA bundle (mounted over
    the image's, for an HTTPS proxy with a CA of its own). Where a find-links folder holds the CPU torch wheel,
    torch comes from there (TORCH_INDEX_URL empty) instead of download.pytorch.org."""
    config, options = pip_config(), []

    def local(url: str) -> Path | None:
        path = Path(url.removeprefix("file://")) if url.startswith(("file://", "/")) else None
        return path if path is not None and path.exists() else None

    mounted: set[Path] = set()
    for key, arg in (("index-url", "PIP_INDEX_URL"), ("extra-index-url", "PIP_EXTRA_INDEX_URL"),
                     ("find-links", "PIP_FIND_LINKS")):
        urls = config.get(key, "").split()
        kept = [u for u in urls if not u.startswith(("file://", "/")) or local(u)]
        for url in kept:
            if (path := local(url)) is not None:
                if key != "find-links" and path.name == "simple":
                    path = path.parent  # a local index's pages link to files beside simple/
                if path not in mounted:
                    mounted.add(path)
                    options += ["-v", f"{path}:{path}:ro"]
        if kept:
            options += ["--build-arg", f"{arg}={' '.join(kept)}"]
    wheels = [local(u) for u in config.get("find-links", "").split()]
    if any(p is not None and p.is_dir() and any(p.glob(TORCH + "*.whl")) for p in wheels):
        options += ["--build-arg", "TORCH_INDEX_URL="]
    if CA_BUNDLE.is_file():
        options += ["-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "--build-arg", f"PIP_CERT={CA_BUNDLE}"]
    return options


@pytest.fixture(scope="module")
def image() -> str:
    if PODMAN is None:
        pytest.skip("podman is not installed (apt-get install podman runc)")
    base = os.environ.get("ALIGNSEARCH_DOCKER_BASE") or next((b for b in BASES if has_image(b)), None)
    if base is None or not has_image(base):
        pytest.skip(f"no base image in podman ({base or ' or '.join(BASES)}): make one as docs/deployment.md "
                    "shows (mmdebstrap + podman import), or set ALIGNSEARCH_DOCKER_BASE")
    extra = os.environ.get("ALIGNSEARCH_PODMAN_BUILD_ARGS")
    options = shlex.split(extra) if extra is not None else host_pip_options()
    started = time.monotonic()  # the docker format: OCI images have no HEALTHCHECK
    podman("build", "--format", "docker", *run_options(), *options, "--build-arg", f"BASE={base}",
           "-f", "docker/Dockerfile.cpu", "-t", IMAGE, str(REPO), timeout=3600)
    size = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Size"]
    print(f"built {IMAGE} on {base} in {time.monotonic() - started:.0f} s; {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture
def volume():
    name = f"alignsearch-test-{secrets.token_hex(4)}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "--force", name, check=False)


def readable_photos(folder: Path) -> Path:
    """The demo photos and their captions in ``folder``, readable by the image's user (uid 10001)."""
    from alignsearch.service.demo import sample_photos

    sample_photos(folder)
    shutil.copyfile(DEMO_CAPTIONS, folder / "captions.jsonl")
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def wait_ready(url: str, container: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        state = json.loads(podman("inspect", container).stdout)[0]["State"]
        assert state["Running"], f"the server exited ({state['ExitCode']}):\n" + \
            podman("logs", container, check=False).stderr[-3000:]
        time.sleep(1)
    raise AssertionError("not ready in time:\n" + podman("logs", container, check=False).stderr[-3000:])


def test_the_image_indexes_photos_serves_them_and_answers_a_text_search_through_its_port(image, volume, tmp_path):
    user = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]["User"]
    assert user.split(":")[0] not in ("", "0", "root")
    photos = readable_photos(tmp_path / "photos")
    common = [*run_options(), "-v", f"{photos}:/photos:ro"]
    # the index, built in a container of the image into the named volume (the compose file's build-index)
    built = podman("run", "--rm", *common, "-v", f"{volume}:/index", image, "index", "build", "--images", "/photos",
                   "--captions", "/photos/captions.jsonl", "--out", "/index/current", "--device", "cpu", "--quiet",
                   timeout=900)
    assert built.returncode == 0
    key = secrets.token_hex(16)
    name = f"alignsearch-test-{secrets.token_hex(4)}"
    podman("run", "--detach", "--name", name, *common, "-v", f"{volume}:/index:ro", "-e", f"ALIGNSEARCH_API_KEY={key}",
           "--publish", "127.0.0.1::8000", image, "serve", "--index", "/index/current", "--host", "0.0.0.0",
           "--port", "8000")
    try:
        host, _, port = podman("port", name, "8000/tcp").stdout.strip().splitlines()[0].rpartition(":")
        url = f"http://{host}:{port}"
        assert host == "127.0.0.1" and int(port) > 0
        wait_ready(url, name)
        query = {"query": "a cat", "k": 3}
        assert httpx.post(f"{url}/search/text", json=query, timeout=60).status_code == 401  # the key is asked for
        response = httpx.post(f"{url}/search/text", json=query, headers={"Authorization": f"Bearer {key}"},
                              timeout=120)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 3 and Path(results[0]["id"]).name == "chelsea.png", results  # the demo's cat
        photo = httpx.get(url + results[0]["uri"], headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert photo.status_code == 200 and photo.content == (photos / "chelsea.png").read_bytes()  # where recorded
        health = podman("healthcheck", "run", name, check=False, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr  # the image's own HEALTHCHECK
        assert json.loads(podman("inspect", name).stdout)[0]["State"]["Running"]
    finally:
        podman("rm", "--force", "--time", "5", name, check=False, timeout=60)
