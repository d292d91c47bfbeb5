"""The lock file that `make install` installs: it cannot drift from pyproject.toml or from what the Makefile installs.

Every direct dependency (the project's and those of the extras the Makefile installs) must be pinned in the lock at
a version its pyproject.toml specifier allows; a dependency added to pyproject.toml without `make lock` fails here.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
# What the lock is compiled for (Makefile: lock): a requirement whose marker excludes it need not be pinned
LOCK_TARGET = {
    "python_version": "3.11",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
}


def makefile_value(name: str) -> str:
    """A ``NAME := value`` line of the Makefile, so that the test reads what `make install` uses."""
    match = re.search(rf"^{name} := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"the Makefile sets no {name}"
    return match.group(1)


def locked_versions() -> dict[str, Version]:
    """The lock's pins by canonical name; every line that is not a comment must be one."""
    pins: dict[str, Version] = {}
    for line in (ROOT / makefile_value("LOCK")).read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"not an exact pin: {line!r}"
        pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def installed_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies plus those of each extra `make install` installs, on the lock's target."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = makefile_value("EXTRAS").split(",")
    unknown = set(extras) - set(project["optional-dependencies"])
    assert not unknown, f"the Makefile installs extras pyproject.toml lacks: {sorted(unknown)}"
    lines = project["dependencies"] + [line for extra in extras for line in project["optional-dependencies"][extra]]
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if r.marker is None or r.marker.evaluate(LOCK_TARGET)]


@pytest.mark.parametrize("requirement", installed_requirements(), ids=str)
def test_the_lock_pins_every_direct_dependency_where_pyproject_allows(requirement: Requirement) -> None:
    pins = locked_versions()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} is not in the lock: run `make lock`"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"the lock pins {name}=={pins[name]}, which {requirement} refuses: run `make lock`"
    )


def test_make_install_installs_the_lock_and_follows_its_changes() -> None:
    """The stamp depends on the lock (a new lock reinstalls), and pip gets the lock as its requirements."""
    lock = makefile_value("LOCK")
    dry_run = subprocess.run(
        ["make", "-n", "-W", lock, ".venv/.installed"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert f"pip install -q -r {lock} -e " in dry_run, dry_run
    latest = subprocess.run(["make", "-n", "install-latest"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--upgrade --upgrade-strategy eager" in latest and f"-r {lock}" not in latest
