"""Rendering the sbatch templates with hostile slurm.* values (no Slurm needed): what an #SBATCH line cannot
carry is refused naming the key; everything else lands as inert text. The rendered scripts are run by
bash against stub srun/scontrol/scancel/python, which record their arguments: no injected command runs
and the container options arrive as the exact words given."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from defend.config import ConfigError, load_config
from launchers.slurm import render, template_path

STUB = """#!/bin/bash
case "$(basename "$0")" in
  scontrol) case "$1 $2" in
      "show hostnames") echo n1 ;;
      "show node") echo "NodeName=n1 NodeAddr=127.0.0.1 State=IDLE" ;;
    esac ;;
  srun|python) printf '%s\\0' "$(basename "$0")" "$@" >> "$STUB_LOG"; printf '\\n' >> "$STUB_LOG" ;;
esac
exit 0
"""
SLURM_ENV = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_CPUS_PER_TASK": "2",
             "SLURM_NODEID": "0"}
# each would create a file named PWNED* if it ever ran as shell
IMAGE = "img $(touch PWNED_image) `touch PWNED_tick`"
MOUNTS = "/data:/data;touch PWNED_mounts"


def config(tmp_path: Path, **slurm):
    cfg = load_config("finetune_tiny_mllm", [f"output_dir={tmp_path / 'run'}"])
    return dataclasses.replace(cfg, slurm=dataclasses.replace(cfg.slurm, **slurm))


def rendered(recipe: str, cfg) -> str:
    return render(recipe, cfg, Path(cfg.output_dir) / "slurm" / "config.yaml", template_path(recipe, cfg))


@pytest.mark.parametrize("key, value", [
    ("job_name", "x\n$(touch /tmp/pwned)"),
    ("partition", "gpu\nrm -rf ~"),
    ("account", "lab #trailing"),
    ("mem", "64G'"),
    ("time", "01:00:00\n$(touch /tmp/pwned)"),
    ("time", "1 hour"),
])
def test_a_value_an_sbatch_line_cannot_carry_is_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"^slurm.{key}: "):
        rendered("finetune", config(tmp_path, **{key: value}))


@pytest.mark.parametrize("args, index", [(["--qos=high", "--comment=x\n$(touch /tmp/pwned)"], 1),
                                         (["--comment='a b'"], 0), (["qos=high"], 0), (["--x='open"], 0)])
def test_sbatch_args_are_split_into_words_and_each_checked(tmp_path, args, index):
    with pytest.raises(ConfigError, match=rf"^slurm\.sbatch_args\[{index}\]: "):
        rendered("finetune", config(tmp_path, sbatch_args=args))
    script = rendered("finetune", config(tmp_path, sbatch_args=["--qos=high", "--gres=gpu:2  --exclusive"]))
    assert "#SBATCH --qos=high\n#SBATCH --gres=gpu:2 --exclusive\n" in script


def test_an_output_dir_or_working_directory_with_a_newline_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="^output_dir: "):
        rendered("finetune", config(tmp_path / "a\nb"))
    (tmp_path / "c\nd").mkdir()
    monkeypatch.chdir(tmp_path / "c\nd")
    with pytest.raises(ConfigError, match="^the working directory: "):
        rendered("finetune", config(tmp_path))


def test_the_cli_refuses_a_hostile_job_name_before_writing_anything(tmp_path):
    done = subprocess.run([sys.executable, "-m", "defend.cli", "submit", "slurm", "finetune", "--config",
                           "finetune_tiny_mllm", "--dry-run", f"output_dir={tmp_path / 'run'}",
                           "slurm.job_name=x\n$(touch /tmp/pwned)"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "slurm.job_name: " in done.stderr and "#SBATCH" not in done.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["finetune", "purify", "disp"])  # train_deepspeed, purify_ray, ray_cluster
def test_hostile_values_render_inert_and_running_the_script_runs_none_of_them(tmp_path, monkeypatch, recipe):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name in ("srun", "scontrol", "scancel", "python"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    # the submit folder (the job's --chdir and the container's workdir) and the job name carry a command
    workdir = tmp_path / "w$(touch${IFS}PWNED_workdir)"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    cfg = config(tmp_path, job_name="x$(touch${IFS}PWNED_name)", partition="p;touch${IFS}PWNED_partition",
                 container_image=IMAGE, container_mounts=MOUNTS, python=str(stubs / "python"))
    script = rendered(recipe, cfg)
    assert "#SBATCH --job-name=x$(touch${IFS}PWNED_name)\n" in script
    assert f"#SBATCH --chdir={workdir}\n" in script
    path = tmp_path / f"{recipe}.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0

    log = tmp_path / "stub.log"
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path), "STUB_LOG": str(log), **SLURM_ENV}
    done = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(tmp_path.rglob("PWNED*")), "an injected command ran"
    calls = [line.split("\0") for line in log.read_text().split("\0\n") if line]
    sruns = [c for c in calls if c[0] == "srun"]
    assert sruns, calls  # the script got as far as its srun steps
    for call in sruns:  # the container options, each one word, exactly as configured
        assert [f"--container-image={IMAGE}", f"--container-workdir={workdir}", f"--container-mounts={MOUNTS}"] \
            == [a for a in call if a.startswith("--container-")], call
    runs = [c for c in calls if "defend.cli" in c]
    assert runs and all(c[c.index("--config") + 1] == f"{tmp_path}/run/slurm/config.yaml" for c in runs)


def test_without_a_container_the_srun_steps_get_no_container_options(tmp_path):
    script = rendered("finetune", config(tmp_path))
    assert "SRUN_CONTAINER=()" in script
