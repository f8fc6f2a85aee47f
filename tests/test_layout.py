"""The repository layout keeps Python's own `platform` module and installs both packages."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_stdlib_platform_is_not_shadowed_from_repo_root():
    out = _python("import platform, sysconfig; print(platform.system()); print(platform.__file__); "
                  "print(sysconfig.get_paths()['stdlib'])", cwd=REPO)
    system, module_file, stdlib = out.splitlines()
    assert system == "Linux" or system in ("Darwin", "Windows")
    assert Path(module_file).resolve().parent == Path(stdlib).resolve()
    assert not (REPO / "platform" / "__init__.py").exists()


def test_packages_import_from_outside_the_repo(tmp_path):
    out = _python("import ssl_platform, ssl_models, ssl_platform.cli; print(ssl_platform.__file__); "
                  "print(ssl_models.__file__)", cwd=tmp_path)
    platform_file, models_file = out.splitlines()
    assert Path(platform_file).parent.name == "ssl_platform"
    assert Path(models_file).parent.name == "ssl_models"


def test_presets_ship_as_package_data(tmp_path):
    out = _python("from ssl_platform.config import list_presets; print(' '.join(list_presets()))", cwd=tmp_path)
    assert "simclr-digits" in out.split()


def test_non_editable_install_imports_from_outside_the_repo(tmp_path):
    """`pip install .` (a built wheel, not the editable finder) carries both packages and the presets."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    def pip(*args: str) -> None:
        done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    pip("wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(wheels), str(REPO))
    pip("install", "--no-deps", "--quiet", "--target", str(target), *map(str, wheels.glob("*.whl")))
    code = (f"import sys; sys.path.insert(0, {str(target)!r}); import ssl_platform, ssl_models; "
            "from ssl_platform.config import list_presets; "
            "print(ssl_platform.__file__); print(ssl_models.__file__); print(' '.join(list_presets()))")
    platform_file, models_file, presets = _python(code, cwd=tmp_path).splitlines()
    assert Path(platform_file).is_relative_to(target) and Path(models_file).is_relative_to(target)
    assert "simclr-digits" in presets.split()
