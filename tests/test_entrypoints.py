"""Every entry point checks before working (issue "Truthful reruns", items 3-4): the tracking
preflight of a lone stage, one run of a stage per artifacts folder, `tlcm generate`'s step
counts, a full disk and an unwritable folder. Each case ends in exit code 2 with one line that
says what to do, never in a traceback or a half-written output."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import REPO, run_cli
from servers import free_port


def _one_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_lone_stage_with_tracking_on_fails_fast_against_an_unreachable_server(tmp_path):
    """Before: 4 minutes of retries, then a 121-line traceback (the `tlcm run` preflight was not applied)."""
    port = free_port()  # nothing listens there
    r = run_cli("stage", "world", "--preset", "smoke", "--artifacts", str(tmp_path / "art"), timeout=90,
                env={"TLCM_TRACKING": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    line = _one_error(r)
    assert f"127.0.0.1:{port}" in line and "not reachable" in line
    assert not (tmp_path / "art" / "world").exists()


def test_generate_refuses_unsupported_step_counts_in_one_line(smoke_artifacts, tmp_path):
    """Before: --steps 0 wrote a pure-noise PNG with exit 0; --lora … --steps 9 ended in a traceback."""
    out = tmp_path / "x.png"
    common = ("--preset", "smoke", "--artifacts", str(smoke_artifacts.root), "--prompt", "a red circle", "--out", str(out))
    line = _one_error(run_cli("generate", "--steps", "0", *common))
    assert "--steps 0" in line and "between 1 and 1000" in line
    line = _one_error(run_cli("generate", "--steps", "9", "--lora", str(tmp_path / "some_lora"), *common))
    assert "--steps 9" in line and "between 1 and 8" in line
    assert not out.exists()


def _lock_file(artifacts, stage):
    return artifacts / ".locks" / f"{stage}.lock"


def test_second_run_of_a_stage_on_one_folder_is_refused_and_a_stale_lock_taken_over(tmp_path):
    """Before: two runs of one stage on one folder both trained, with no lock."""
    art = tmp_path / "art"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = _lock_file(art, "world")
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(), "stage": "world",
                                    "started": "2024-01-01T00:00:00+00:00"}))
        line = _one_error(run_cli("stage", "world", "--preset", "smoke", "--artifacts", str(art)))
        assert f"pid {owner.pid}" in line and "already running" in line and f"`rm {lock}`" in line
        assert not (art / "world").exists() and lock.is_file()
    finally:
        owner.kill()
        owner.wait()
    r = run_cli("stage", "world", "--preset", "smoke", "--artifacts", str(art))  # the owner is gone: taken over
    assert r.returncode == 0, r.stderr
    assert "taking over the stale lock" in r.stderr and f"pid {owner.pid}" in r.stderr
    assert (art / "world").is_dir() and not lock.exists()


def test_the_lock_command_in_the_message_works_when_followed(tmp_path):
    art = tmp_path / "art"
    lock = _lock_file(art, "world")
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"pid": 1, "host": "another-host", "stage": "world", "started": "then"}))
    line = _one_error(run_cli("stage", "world", "--preset", "smoke", "--artifacts", str(art)))
    assert "host another-host" in line
    command = line.split("`")[1]
    assert subprocess.run(command, shell=True).returncode == 0
    assert run_cli("stage", "world", "--preset", "smoke", "--artifacts", str(art)).returncode == 0


def _no_temporaries(folder) -> list:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_full_disk_is_one_line_naming_the_folder_and_publishes_nothing(tmp_path):
    """Before: a traceback. A 16 KiB tmpfs (in a user+mount namespace) fills up while `world` writes."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"]).returncode != 0:
        pytest.skip("needs `unshare -Urm` (user + mount namespaces) to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    cli = f"{sys.executable} -m flows.cli stage world --preset smoke --artifacts {mnt}/art"
    script = f"mount -t tmpfs -o size=16k none {mnt} && cd {REPO} && {cli}; rc=$?; ls -A {mnt}/art >&2; exit $rc"
    r = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    line = _one_error(r)
    assert f"cannot write {mnt}/art/world: no space left on the device" in line and "--artifacts" in line
    listed = r.stderr.strip().splitlines()[-1].split()
    assert "world" not in listed and not any(".tmp-" in n for n in listed), listed  # nothing (half-)published


def test_unwritable_artifacts_folder_is_one_line_with_a_command_that_works(tmp_path):
    """Before: a traceback. The fix the message gives (a chmod) is then followed literally."""
    art = tmp_path / "art"
    art.mkdir()
    art.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores permissions: drop the capability that lets it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    cmd = [*prefix, sys.executable, "-m", "flows.cli", "stage", "world", "--preset", "smoke", "--artifacts", str(art)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    line = _one_error(r)
    assert f"cannot write {art}" in line and "permission denied" in line
    assert list(art.iterdir()) == []
    fix = line.split("`")[1]
    assert fix.startswith("chmod") and subprocess.run([*prefix, "sh", "-c", fix]).returncode == 0
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert (art / "world").is_dir() and not _no_temporaries(art)
