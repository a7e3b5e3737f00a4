"""The package as users install it: a wheel that holds every module, and a `direct-align` that
runs from it in a fresh virtual environment (not the editable checkout)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:  # noqa: ANN003
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600,
                            **kwargs)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # the checkout's own setuptools when it can build wheels (70.1+), else pip's isolated build
    setuptools = tuple(int(p) for p in version("setuptools").split(".")[:2])
    isolation = [] if setuptools >= (70, 1) else ["--use-pep517"]
    no_isolation = ["--no-build-isolation"] if not isolation else []
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, *isolation, "-w", out,
        ROOT, cwd=out)  # fmt: skip
    wheels = list(out.glob("direct_align-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_the_wheel_holds_every_module_of_the_package(wheel: Path) -> None:
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "direct_align").rglob("*.py")}
    with zipfile.ZipFile(wheel) as z:
        packed = {n for n in z.namelist() if n.startswith("direct_align/") and n.endswith(".py")}
    assert source == packed, f"missing from the wheel: {sorted(source - packed)}"


def test_direct_align_runs_from_the_wheel_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    # the dependencies come from this environment's site-packages (no download); the package
    # itself only from the wheel: that site-packages holds no copy of it (an editable install)
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; "
                    "print(sysconfig.get_paths()['purelib'])").stdout.strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    help_text = run(venv / "bin" / "direct-align", "--help", cwd=tmp_path, env=env).stdout
    for command in ("train", "train-rm", "ppo", "compare", "label", "select"):
        assert command in help_text
    where = run(venv / "bin" / "python", "-c",
                "import direct_align, pkgutil, importlib\n"
                "for m in pkgutil.walk_packages(direct_align.__path__, 'direct_align.'):\n"
                "    if not m.name.endswith('__main__'):\n"
                "        importlib.import_module(m.name)\n"
                "print(direct_align.__file__)", cwd=tmp_path, env=env).stdout.strip()  # fmt: skip
    assert where.startswith(str(site)), where  # the wheel's copy, not the checkout
    run(venv / "bin" / "direct-align", "ppo", "--help", cwd=tmp_path, env=env)
