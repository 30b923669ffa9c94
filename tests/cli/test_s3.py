"""Every CLI command on s3:// URLs of a real S3 API server (moto in server mode), options given with
``--storage-option``; no output ever shows the secret key."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

import trainstate
from s3support import SECRET, client


def _state(step: int) -> dict[str, object]:
    torch.manual_seed(step)
    return {"model": {"w": torch.randn(16, 4), "b": torch.zeros(4)}, "epoch": step}


@pytest.fixture
def s3_cli(cli, s3_run):
    url, opts = s3_run
    with trainstate.CheckpointManager(url, keep_last=None, storage_options=opts) as manager:
        for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7)]:
            manager.save(step, _state(step), {"loss": loss})
    flags = [
        "-S",
        f"endpoint_url={opts['endpoint_url']}",
        "-S",
        "key=testing",
        "-S",
        f"secret={SECRET}",
        "-S",
        "client_kwargs.region_name=us-east-1",
    ]

    def run(*args: object) -> object:
        result = cli(*flags, *args)
        assert SECRET not in result.stdout and SECRET not in result.stderr
        return result

    return run, url


def test_ls_inspect_and_diff(s3_cli):
    run, url = s3_cli
    listed = run("ls", url, "--json")
    assert listed.exit_code == 0, listed.stderr
    rows = json.loads(listed.stdout)
    rows = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [r["name"] for r in rows] == ["step_00000001", "step_00000002", "step_00000003"]
    shown = run("inspect", f"{url}/step_00000003")
    assert shown.exit_code == 0 and "model" in shown.stdout and "epoch" in shown.stdout, shown.stderr
    compared = run("diff", f"{url}/step_00000001", f"{url}/step_00000003")
    assert compared.exit_code == 0 and "1 changed" in compared.stdout and "metrics.loss" in compared.stdout


def test_verify_finds_a_damaged_object(s3_cli, s3_endpoint):
    run, url = s3_cli
    assert run("verify", url).exit_code == 0
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    s3 = client(s3_endpoint)
    key = next(
        o["Key"]
        for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/step_00000002/")["Contents"]
        if o["Key"].endswith(".safetensors")
    )
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 1
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    checked = run("verify", url)
    assert checked.exit_code == 1 and "step_00000002" in checked.stdout + checked.stderr
    assert "content hash mismatch" in checked.stdout + checked.stderr


def test_export_convert_and_prune(s3_cli, tmp_path):
    run, url = s3_cli
    out = tmp_path / "model.safetensors"
    exported = run("export", f"{url}/step_00000003", out)
    assert exported.exit_code == 0, exported.stderr
    tensors = safetensors.torch.load_file(out)
    assert torch.equal(tensors.get("model.w", tensors.get("w")), _state(3)["model"]["w"]), sorted(tensors)
    converted = run("convert", f"{url}/step_00000002", tmp_path / "two.pt")
    assert converted.exit_code == 0, converted.stderr
    assert torch.load(tmp_path / "two.pt")["epoch"] == 2
    pruned = run("prune", url, "--keep-last", "1")
    assert pruned.exit_code == 0, pruned.stderr
    listed = json.loads(run("ls", url, "--json").stdout)
    listed = listed["checkpoints"] if isinstance(listed, dict) else listed
    assert [r["name"] for r in listed] == ["step_00000003"]


def test_convert_a_torch_file_into_s3(s3_cli, tmp_path, s3_run):
    run, url = s3_cli
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 9}, tmp_path / "old.pt")
    converted = run("convert", tmp_path / "old.pt", f"{url}/converted")
    assert converted.exit_code == 0, converted.stderr
    assert trainstate.load(f"{url}/converted", storage_options=s3_run[1])["epoch"] == 9
    again = run("convert", tmp_path / "old.pt", f"{url}/converted")
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_a_bad_storage_option_is_a_usage_error(cli):
    result = cli("-S", "novalue", "ls", "s3://b/r")
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr
