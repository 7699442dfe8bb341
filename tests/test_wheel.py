"""The package installs: a wheel built from this checkout, installed into a fresh virtualenv outside it,
finds its DeepSpeed JSONs and Slurm templates from any folder (issue 21).

Slow-ish (about 45 s: a wheel build and six `defend` processes); `pytest -m "not slow"` skips those.
The fresh venv sees the project venv's packages (torch, deepspeed, ...) through a .pth line, added after
the wheel is installed, so nothing is downloaded; defend itself comes from the wheel, never the checkout.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the wheel is built from: the package sources and their data, never build/ or caches of the checkout
SOURCES = ("pyproject.toml", "README.md", "defend", "recipes", "launchers", "ds_configs", "slurm")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "runs")
CONFIG = "finetune_tiny_mllm"


def run(command: list, cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def why(done: subprocess.CompletedProcess) -> str:
    return (f"{' '.join(done.args)} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
            f"--- stderr\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, its site-packages, an env that runs it, a folder outside the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", PIP_NO_INPUT="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    src = base / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=IGNORED)
        else:
            shutil.copy2(ROOT / name, src / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(base / "dist"), str(src)], base, env)
    assert built.returncode == 0, why(built)
    wheels = list((base / "dist").glob("defend-*.whl"))
    assert len(wheels) == 1, f"expected one defend wheel, got {wheels}"

    venv = base / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    assert made.returncode == 0, why(made)
    python = venv / "bin" / "python"
    done = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                str(wheels[0])], base, env)
    assert done.returncode == 0, why(done)
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    base, env).stdout.strip())
    # the project venv's dependencies, behind the venv's own site-packages (a plain path: its .pth files,
    # the editable checkout's finder among them, are not run)
    (site / "zz_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return venv, site, env, elsewhere


@pytest.mark.slow
def test_the_wheel_holds_the_deepspeed_configs_and_slurm_templates(installed):
    venv, site, env, elsewhere = installed
    for path in ("ds_configs/zero0.json", "ds_configs/zero2.json", "ds_configs/zero3.json",
                 "ds_configs/zero3_offload.json", "slurm/train_deepspeed.sbatch", "slurm/ray_cluster.sbatch",
                 "slurm/purify_ray.sbatch", "slurm/lib/requeue.sh", "slurm/lib/ray_cluster.sh",
                 "recipes/configs/finetune_tiny_mllm.yaml"):
        assert (site / path).is_file(), f"the installed wheel lacks {path} (pyproject's package-data)"
    code = ("import defend, launchers.slurm, recipes; from defend.shipped import DS_CONFIG_DIR, SLURM_DIR;"
            " print(defend.__file__, launchers.slurm.__file__, recipes.__path__[0], DS_CONFIG_DIR, SLURM_DIR)")
    probe = run([venv / "bin" / "python", "-c", code], elsewhere, env)
    assert probe.returncode == 0, why(probe)
    for line in probe.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), \
            f"{line} is not the wheel's (under {site}): the checkout leaked into the fresh venv"
        assert not Path(line).resolve().is_relative_to(ROOT), line


@pytest.mark.slow
def test_installed_defend_validates_with_a_shipped_deepspeed_config_from_another_folder(installed):
    venv, site, env, elsewhere = installed
    defend = str(venv / "bin" / "defend")
    ok = run([defend, "validate", CONFIG, "deepspeed=zero3", f"output_dir={elsewhere / 'ft'}"], elsewhere, env)
    assert ok.returncode == 0, why(ok)
    assert f"# {CONFIG}: valid" in ok.stdout and "deepspeed: zero3" in ok.stdout
    # a wrong name is told the shipped ones, read from the installed folder
    typo = run([defend, "validate", CONFIG, "deepspeed=zero9", f"output_dir={elsewhere / 'ft'}"], elsewhere, env)
    assert typo.returncode != 0 and "did you mean 'zero3'" in typo.stderr, why(typo)
    assert str(site / "ds_configs" / "zero9.json") in typo.stderr, typo.stderr


def sourced_files(script: str) -> list[Path]:
    return [Path(p) for p in re.findall(r"^source (\S+)$", script, flags=re.MULTILINE)]


@pytest.mark.parametrize("template, libs", [("train_deepspeed", {"requeue.sh"}),
                                            ("ray_cluster", {"requeue.sh", "ray_cluster.sh"})])
@pytest.mark.slow
def test_installed_defend_submit_slurm_dry_run_renders_the_shipped_template(installed, template, libs):
    venv, site, env, elsewhere = installed
    out = elsewhere / f"sub_{template}"
    done = run([str(venv / "bin" / "defend"), "submit", "slurm", "finetune", "--config", CONFIG,
                "deepspeed=zero3", f"slurm.template={template}", f"output_dir={out}", "--dry-run"], elsewhere, env)
    assert done.returncode == 0, why(done)
    sourced = sourced_files(done.stdout)
    assert {p.name for p in sourced} == libs, done.stdout
    for path in sourced:
        assert path.is_file() and path.resolve().is_relative_to(site.resolve()), \
            f"the script sources {path}, not a file of the installed wheel under {site}"
    assert f"PYTHON={venv / 'bin' / 'python'}" in done.stdout, "the job would not run the installed defend"
    assert str(out / "slurm" / "config.yaml") in done.stdout
    assert not out.exists(), "a dry run wrote files"


@pytest.mark.slow
def test_installed_defend_submit_slurm_writes_a_config_the_installed_defend_validates(installed, tmp_path):
    venv, _, env, elsewhere = installed
    fake = tmp_path / "bin"  # an sbatch that accepts the script: what submit writes is what we check
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (fake / "sbatch").chmod(0o755)
    env = {**env, "PATH": f"{fake}{os.pathsep}{env['PATH']}"}
    out = elsewhere / "submitted"
    done = run([str(venv / "bin" / "defend"), "submit", "slurm", "finetune", "--config", CONFIG,
                "deepspeed=zero3", f"output_dir={out}"], elsewhere, env)
    assert done.returncode == 0 and "submitted batch job 4242" in done.stdout, why(done)
    script = (out / "slurm" / "finetune.sbatch").read_text()
    assert all(p.is_file() for p in sourced_files(script)) and sourced_files(script), script
    again = run([str(venv / "bin" / "defend"), "validate", str(out / "slurm" / "config.yaml")], elsewhere, env)
    assert again.returncode == 0, why(again)
    assert "deepspeed: zero3" in again.stdout and f"output_dir: {out}" in again.stdout, again.stdout


def test_a_missing_shipped_folder_is_named_with_the_fix(monkeypatch, tmp_path, make_cfg):
    from defend.config import ConfigError
    from defend.engine import ds_config
    from launchers import slurm

    monkeypatch.setattr(ds_config, "DS_CONFIG_DIR", tmp_path / "ds_configs")
    with pytest.raises(ConfigError, match=r"deepspeed=zero3: the folder shipped with defend, .*ds_configs, is"
                                          r" missing; this install of defend lacks its data files"):
        ds_config.load_ds_config("zero3")
    monkeypatch.setattr(slurm, "SLURM_DIR", tmp_path / "slurm")
    with pytest.raises(ConfigError, match=r"slurm.template=train_deepspeed: the folder shipped .*lacks its data"):
        slurm.template_path("finetune", make_cfg("mllm", "slurm.template=train_deepspeed"))
