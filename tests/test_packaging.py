"""The built wheel: every module of ``fastclip/`` and ``kernels/`` (as ``fastclip.kernels``), the
``py.typed`` marker, the ``fastclip-bench`` script's module, and no top-level ``kernels``.

CI installs the project in editable mode, which finds modules in the source tree whatever the
package list says; only a built wheel shows what a ``pip install fastclip`` user gets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("setuptools", reason="the wheel is built without isolation, by this setuptools")


def _modules(folder: Path, prefix: str) -> set[str]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what the build reads: setuptools packs ROOT/build/lib, where an older
    # build may have left modules that the package list no longer names.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("fastclip", "kernels"):
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--no-cache-dir", str(source), "-w", str(out)], check=True, timeout=300)
    (path,) = out.glob("fastclip-*.whl")
    return path


def test_wheel_holds_every_module_under_fastclip(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = (_modules(ROOT / "fastclip", "fastclip") | _modules(ROOT / "kernels", "fastclip/kernels")
                | {"fastclip/py.typed"})
    assert "fastclip/bench/cli.py" in expected and "fastclip/kernels/cpu.py" in expected
    assert sorted(expected - names) == []
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels module"
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
    top_level = zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == ["fastclip"]
    scripts = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "fastclip-bench = fastclip.bench:main" in scripts


def test_wheel_ships_the_license_text(wheel):
    # BSD-3-Clause asks for the text to travel with every copy.
    names = zipfile.ZipFile(wheel).namelist()
    licenses = [n for n in names if ".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE"]
    assert licenses, names
    assert b"BSD 3-Clause" in zipfile.ZipFile(wheel).read(licenses[0])


def test_sdist_holds_what_its_tests_need(tmp_path):
    """The source archive's tests import their helpers (conftest.py, reference.py, ...) and run
    the examples and benchmark scripts: every tracked file of those folders ships, and no cache."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout, to know the tracked files")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    (source / "kernels" / "__pycache__").mkdir(exist_ok=True)
    (source / "kernels" / "__pycache__" / "cpu.stale.nbi").write_bytes(b"")
    out = tmp_path / "dist"
    # Run from elsewhere, source off sys.path: there its kernels/ would shadow an installed
    # package of that name (Hugging Face's, which a setuptools plugin imports).
    build = ("import os, sys; sys.path = [p for p in sys.path if p not in ('', os.getcwd())]; "
             "os.chdir(sys.argv[2]); from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", build, str(out), str(source)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (archive,) = out.glob("fastclip-*.tar.gz")
    import tarfile

    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {n for n in tracked if n.split("/")[0] in ("tests", "examples", "benchmarks", "docs")}
    assert {"tests/conftest.py", "tests/reference.py", "LICENSE"} <= names
    assert sorted(wanted - names) == []
    assert not [n for n in names if "__pycache__" in n]


def test_installed_wheel_imports_and_runs_the_bench_cli(wheel, tmp_path):
    # A wheel of pure Python installs by unpacking; the unpacked copy comes first on the path,
    # and the editable install's finder (which would supply any module the wheel lacks from the
    # source tree) is taken out.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable__')]; "
            "import fastclip, fastclip.kernels, fastclip.bench; print(fastclip.__file__); "
            "print(fastclip.kernels.__file__); fastclip.bench.main(['--help'])")
    env = {**os.environ, "PYTHONPATH": str(site), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    package, kernels = run.stdout.splitlines()[:2]
    assert package == str(site / "fastclip" / "__init__.py")
    assert kernels == str(site / "fastclip" / "kernels" / "__init__.py")
    assert "--preset" in run.stdout


@pytest.mark.parametrize("script", [None, "bench_cuda.py", "bench_compile.py", "host_proxy.py"])
def test_the_source_tree_does_not_shadow_a_top_level_kernels_package(script):
    # With the repository root on sys.path, ``kernels/`` is a top-level ``kernels`` found before
    # Hugging Face's package of that name (transformers >= 5 imports it). ``python -m pytest``
    # puts the root there (conftest.py takes it off), and so did the benchmark scripts, which
    # the tests import. Whatever `kernels` resolves to, it is not ours.
    import importlib.machinery
    import importlib.util

    if script is not None:
        spec = importlib.util.spec_from_file_location(f"_shadow_{script[:-3]}", ROOT / "benchmarks" / script)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    spec = importlib.machinery.PathFinder.find_spec("kernels")  # sys.path itself, not sys.modules
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    assert origin is None or ROOT / "kernels" not in origin.parents, origin
