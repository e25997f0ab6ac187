#!/usr/bin/env python3
"""The project's own checks of the Dockerfile, beyond what hadolint knows.

hadolint (run first by scripts/dockerfile.sh) checks Dockerfile practice:
non-root last USER, exec-form ENTRYPOINT/CMD, apt hygiene, and so on. This
script checks what only this repository can say, reading the Dockerfile with
dockerfile-parse (not a parser of our own):

- the build stage runs one `cargo build`: the README's release build
  (`--release --locked -p <the shipped package>`) and nothing that changes
  what is compiled compared with CI;
- every path a COPY names exists, and the build stage copies everything cargo
  reads before it builds (the workspace manifest and lock file, every member's
  manifest and sources, crates patched in by path, files the code includes with
  include_str!/include_bytes!);
- the runtime stage copies the binary the build produced and starts it, with
  the config file it copied; the ports its SESSIONGUARD_LISTEN / _ADMIN
  environment sets are EXPOSEd, its HEALTHCHECK asks the admin port's
  /healthz, and every SESSIONGUARD_* variable it sets is one sessionguard reads.

Usage: dockerfile_checks.py [DOCKERFILE] (default: the repository's). Paths
are resolved against the repository. Exits 1 listing every failed check.
"""

import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "crates" / "sessionguard"

failures = []


def check(ok, message):
    if not ok:
        failures.append(message)
    return ok


def stages(structure):
    """Instructions (comments dropped) split at each FROM."""
    out = []
    for item in structure:
        if item["instruction"] == "COMMENT":
            continue
        if item["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(item)
    return out


def exec_form(value):
    value = value.strip()
    return json.loads(value) if value.startswith("[") else shlex.split(value)


def copies(stage):
    """(sources, destination, flags) of each COPY."""
    out = []
    for item in stage:
        if item["instruction"] != "COPY":
            continue
        words = shlex.split(item["value"])
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1], flags))
    return out


def compile_time_inputs(src):
    """Files the compiler reads through include_str!/include_bytes! outside
    test modules, relative to the repository."""
    found = []
    for path in src.rglob("*.rs"):
        code = path.read_text().split("#[cfg(test)]")[0]
        for relative in re.findall(r'include_(?:str|bytes)!\("([^"]+)"\)', code):
            found.append((path.parent / relative).resolve().relative_to(ROOT).as_posix())
    return found


def main():
    dockerfile = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "Dockerfile"
    parsed = DockerfileParser(path=str(dockerfile))
    all_stages = stages(parsed.structure)
    if not check(len(all_stages) >= 2, "a multi-stage build (build, runtime)"):
        return
    build, runtime = all_stages[0], all_stages[-1]
    package = tomllib.loads((PACKAGE_DIR / "Cargo.toml").read_text())["package"]["name"]

    # The one cargo build is the README's release build of the shipped package.
    runs = [i for i in build if i["instruction"] == "RUN" and "cargo build" in i["value"]]
    if not check(len(runs) == 1, f"exactly one `cargo build` in the build stage, got {len(runs)}"):
        return
    command = next(c for c in runs[0]["value"].split("&&") if "cargo build" in c)
    flags = shlex.split(command)[2:]
    readme = (ROOT / "README.md").read_text().splitlines()
    release = next(
        (l for l in readme if l.strip().startswith("cargo build") and "--release" in l), None
    )
    if check(release is not None, "README shows the release build"):
        for flag in shlex.split(release.split("#")[0])[2:]:
            check(flag in flags, f"README builds with {flag}; the Dockerfile with {flags}")
    check("--locked" in (ROOT / "scripts" / "test.sh").read_text(), "CI builds --locked")
    allowed = {"--release", "--locked", "-p", "--package", package}
    for flag in flags:
        check(flag in allowed, f"`{flag}` makes the image differ from the tested build")
    at = next((n for n, f in enumerate(flags) if f in ("-p", "--package")), None)
    check(
        at is not None and flags[at + 1 : at + 2] == [package],
        f"the build names the shipped package `{package}`: {flags}",
    )

    # Every copied path exists; the build has everything cargo reads.
    for stage in all_stages:
        for sources, _, copy_flags in copies(stage):
            if any(f.startswith("--from") for f in copy_flags):
                continue
            for source in sources:
                check((ROOT / source).exists(), f"COPY `{source}`: not in the repository")
    build_at = build.index(runs[0])
    copied = [
        s.rstrip("/")
        for sources, _, copy_flags in copies(build[:build_at])
        for s in sources
        if not any(f.startswith("--from") for f in copy_flags)
    ]
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    workspace = manifest["workspace"]
    needed = ["Cargo.toml", "Cargo.lock"] + ([".cargo"] if (ROOT / ".cargo").exists() else [])
    # Crates patched in from the repository (vendor/*) are built from there.
    for registry in manifest.get("patch", {}).values():
        needed += [dep["path"].rstrip("/") for dep in registry.values() if "path" in dep]
    for member in workspace["members"]:
        needed.append(f"{member}/Cargo.toml")
        needed += [f"{member}/{p}" for p in ("src", "build.rs", "benches") if (ROOT / member / p).exists()]
        needed += compile_time_inputs(ROOT / member / "src")
    for need in needed:
        check(
            any(need == c or need.startswith(c + "/") for c in copied),
            f"the build needs `{need}`; the build stage copies only {copied}",
        )

    # The runtime stage runs the binary that was built, as configured.
    stage_words = build[0]["value"].split()
    name = stage_words[stage_words.index("AS") + 1] if "AS" in stage_words else None
    workdir = [i["value"] for i in build if i["instruction"] == "WORKDIR"]
    built = f"{workdir[-1].rstrip('/')}/target/release/{package}" if workdir else None
    binary = [c for c in copies(runtime) if f"--from={name}" in c[2]]
    installed = None
    if check(len(binary) == 1 and built is not None, "the runtime copies the build stage's binary"):
        sources, installed, _ = binary[0]
        check(sources == [built], f"the runtime copies {sources}, the build produced {built}")
    entrypoint = [exec_form(i["value"]) for i in runtime if i["instruction"] == "ENTRYPOINT"]
    check(entrypoint[-1:] == [[installed]], f"ENTRYPOINT {entrypoint} starts {installed}")
    cmd = [exec_form(i["value"]) for i in runtime if i["instruction"] == "CMD"]
    if check(cmd and cmd[-1][:1] == ["proxy"] and "--config" in cmd[-1], f"CMD runs `proxy --config`: {cmd}"):
        config = cmd[-1][cmd[-1].index("--config") + 1]
        check(
            any(s == ["config/sessionguard.toml"] and d == config for s, d, _ in copies(runtime)),
            f"the config CMD names ({config}) is the copied config/sessionguard.toml",
        )

    env = {}
    for item in runtime:
        if item["instruction"] == "ENV":
            for pair in shlex.split(item["value"]):
                key, _, value = pair.partition("=")
                env[key] = value
    main_rs = (PACKAGE_DIR / "src" / "main.rs").read_text()
    for key in env:
        if key.startswith("SESSIONGUARD_"):
            check(f'env = "{key}"' in main_rs, f"{key} is not read by sessionguard")
    exposed = {
        port.split("/")[0]
        for item in runtime
        if item["instruction"] == "EXPOSE"
        for port in item["value"].split()
    }
    ports = {}
    for key in ("SESSIONGUARD_LISTEN", "SESSIONGUARD_ADMIN"):
        value = env.get(key, "")
        if check(value.startswith("0.0.0.0:"), f"{key} listens on all interfaces in a container"):
            ports[key] = value.rsplit(":", 1)[1]
            check(ports[key] in exposed, f"{key}'s port {ports[key]} is EXPOSEd ({sorted(exposed)})")
    health = [i["value"] for i in runtime if i["instruction"] == "HEALTHCHECK"]
    admin = ports.get("SESSIONGUARD_ADMIN")
    check(
        health and admin and f":{admin}/healthz" in health[-1],
        f"the HEALTHCHECK asks the admin port's /healthz: {health}",
    )
    check('"/healthz"' in (PACKAGE_DIR / "src" / "admin.rs").read_text(), "the admin API serves /healthz")
    if health and "curl" in health[-1]:
        check(
            any(i["instruction"] == "RUN" and "curl" in i["value"] for i in runtime),
            "curl is installed for the HEALTHCHECK",
        )


if __name__ == "__main__":
    main()
    for failure in failures:
        print(f"Dockerfile: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)
