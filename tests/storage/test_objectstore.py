"""trainstate on a real S3 API server (moto in server mode, its own process on loopback): saves,
loads, the manager, corruption and fallback, racing writers, the lease, SIGKILL mid-upload, and
transient or permanent errors injected by an HTTP proxy between client and server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainstate
from s3support import SECRET, Fault, FaultProxy, client, new_bucket, options
from support import assert_same
from trainstate import CheckpointExistsError, CheckpointLockedError, CheckpointManager, CheckpointWriteError
from trainstate.storage import ObjectStorage, open_storage

WRITER = Path(__file__).with_name("s3_writer.py")


def _state(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(step)
    return {"w": torch.randn(64, 32), "b": torch.arange(step, step + 5)}


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _bucket_of(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


def _keys(endpoint: str, url: str) -> list[str]:
    bucket, prefix = _bucket_of(url)
    found = client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    return sorted(item["Key"][len(prefix) + 1 :] for item in found)


def _damage(endpoint: str, url: str, name: str, suffix: str = ".safetensors") -> str:
    """Flip the last byte of the first data object of checkpoint ``name`` (in place, on the server)."""
    bucket, prefix = _bucket_of(url)
    s3 = client(endpoint)
    key = next(f"{prefix}/{k}" for k in _keys(endpoint, url) if k.startswith(f"{name}/") and k.endswith(suffix))
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-1] ^= 0xFF
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    return key


def test_save_and_load_through_an_s3_url(s3_run):
    url, opts = s3_run
    model, optimizer = _trained()
    trainstate.save(f"{url}/ckpt", {"model": model, "optimizer": optimizer, "epoch": 3}, storage_options=opts)
    fresh, fresh_opt = _trained(seed=1)
    loaded = trainstate.load(f"{url}/ckpt", {"model": fresh, "optimizer": fresh_opt}, storage_options=opts)
    assert loaded["epoch"] == 3
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_opt.state_dict()["state"], optimizer.state_dict()["state"])
    assert trainstate.peek(f"{url}/ckpt", storage_options=opts).state["epoch"] == 3
    assert_same(trainstate.load(f"{url}/ckpt", storage_options=opts)["model"], model.state_dict())


def test_the_manifest_is_plain_json_naming_its_attempt_and_written_last(s3_run, s3_endpoint):
    url, opts = s3_run
    trainstate.save(f"{url}/ckpt", {"w": torch.ones(3)}, storage_options=opts)
    keys = _keys(s3_endpoint, url)
    assert keys[-1] == "ckpt/manifest.json" and all(k.startswith("ckpt/.trainstate-attempt-x-") for k in keys[:-1])
    bucket, prefix = _bucket_of(url)
    import json

    body = json.loads(client(s3_endpoint).get_object(Bucket=bucket, Key=f"{prefix}/ckpt/manifest.json")["Body"].read())
    assert body["trainstate_data"] == keys[0].split("/")[1] and body["format"] == "trainstate"


def test_manager_retention_restore_and_fallback_past_a_damaged_checkpoint(s3_run, s3_endpoint, caplog):
    url, opts = s3_run
    with CheckpointManager(url, keep_last=2, keep_best=1, monitor="loss", storage_options=opts) as manager:
        for step, loss in [(1, 0.5), (2, 0.9), (3, 0.8), (4, 0.7)]:
            manager.save(step, _state(step), {"loss": loss})
        assert manager.steps() == [1, 3, 4] and manager.best_step() == 1
    names = {k.split("/")[0] for k in _keys(s3_endpoint, url)}
    assert names == {"step_00000001", "step_00000003", "step_00000004"}  # retention took step 2, data and all
    _damage(s3_endpoint, url, "step_00000004")
    with CheckpointManager(url, keep_last=2, storage_options=opts) as manager:
        state = {"w": torch.zeros(64, 32), "b": torch.zeros(5, dtype=torch.int64)}
        with caplog.at_level(logging.WARNING):
            assert manager.restore(state) == 3
        assert_same(state, _state(3))
        assert "content hash mismatch" in caplog.text and "step_00000004" in caplog.text
        assert manager.latest_step() == 3  # the damaged one was moved aside: the run goes on from 3
        assert manager.save(4, _state(4))
    assert any(k.startswith("trainstate-quarantine/step_00000004@") for k in _keys(s3_endpoint, url))


@pytest.mark.slow
def test_racing_writers_exactly_one_wins_and_the_checkpoint_is_the_winners(s3_endpoint):
    bucket = new_bucket(s3_endpoint)
    url = f"s3://{bucket}/run/ckpt"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    racers = [
        subprocess.Popen(
            [sys.executable, str(WRITER), "race", url, s3_endpoint, str(value)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for value in range(4)
    ]
    for racer in racers:
        assert racer.stdout.readline().strip() == "ready"
    for racer in racers:  # go
        racer.stdin.write("\n")
        racer.stdin.flush()
    outcomes = [racer.communicate(timeout=120)[0].strip() for racer in racers]
    winners = [i for i, text in enumerate(outcomes) if text == "won"]
    assert len(winners) == 1, outcomes
    assert all("another writer committed it first" in t or "already exists" in t for t in outcomes if t != "won")
    saved = trainstate.load(url, storage_options=options(s3_endpoint))["w"]
    assert torch.equal(saved, torch.full((1 << 16,), float(winners[0])))  # never a mix
    storage = open_storage(f"s3://{bucket}/run", options(s3_endpoint))
    assert storage.files("ckpt") == ["manifest.json", "tensors-00000.safetensors"]
    attempts = {k.split("/")[1] for k in _keys(s3_endpoint, f"s3://{bucket}/run")}
    assert len(attempts) == 2  # the winner's data and the manifest: the losers removed theirs


def test_two_managers_one_lease(s3_run):
    url, opts = s3_run
    first = CheckpointManager(ObjectStorage(url, opts, lease_ttl=30), keep_last=2)
    first.save(1, _state(1))
    second = CheckpointManager(ObjectStorage(url, opts, lease_ttl=30), keep_last=2, lock_timeout=0)
    with pytest.raises(CheckpointLockedError, match="another writer holds the lease"):
        second.save(2, _state(2))
    first.close()  # releases the lease at once
    assert second.save(2, _state(2)) and second.steps() == [1, 2]
    second.close()


def _writer(args: list[str], endpoint: str) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(WRITER), *args[:2], endpoint, *args[2:]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill_when_held(args: list[str], endpoint: str, pattern: str, saved: list[str]) -> None:
    """Run the writer through a proxy that holds the first request matching ``pattern``; once the
    writer printed ``saved`` lines and the request is held, SIGKILL it."""
    proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    hold = Fault(pattern, status=0)
    proxy.faults.append(hold)
    writer = _writer(args, proxy.endpoint)
    try:
        for line in saved:
            assert writer.stdout.readline().split() == line.split()
        assert hold.arrived.wait(120)
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    finally:
        hold.release.set()
        proxy.stop()


def test_sigkill_during_a_multipart_upload_keeps_the_previous_checkpoint(s3_run, s3_endpoint):
    url, opts = s3_run
    # held: the second part of step 2's data, mid-upload
    _kill_when_held(["manager", url], s3_endpoint, r"PUT .*partNumber=2", ["saved 1"])
    s3 = client(s3_endpoint)
    bucket, prefix = _bucket_of(url)
    assert s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")  # left by the dead writer
    storage = ObjectStorage(url, opts, lease_ttl=2)
    with CheckpointManager(storage, keep_last=None, lock_timeout=30) as manager:
        state = {"w": torch.zeros(8), "step": torch.tensor(0)}
        assert manager.restore(state) == 1 and manager.steps() == [1]
        assert manager.save(2, _state(2))  # takes the expired lease; its cleanup removes the leftovers
    assert not s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads")
    attempts = {k.split("/")[1] for k in _keys(s3_endpoint, url) if k.startswith("step_00000002/")}
    assert len(attempts) == 2  # manifest.json and the new attempt: the killed one's objects are gone


def test_transient_errors_are_retried(s3_run, s3_endpoint):
    url, opts = s3_run
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    faults = [
        Fault(r"^PUT .*tensors-00000", 503, "SlowDown", times=2),
        Fault(r"^PUT .*manifest\.json", 500, "InternalError"),
        Fault(r"^GET .*tensors-00000", 503, "ServiceUnavailable"),
    ]
    proxy.faults.extend(faults)
    try:
        via = {**opts, "endpoint_url": proxy.endpoint}
        trainstate.save(f"{url}/ckpt", _state(1), storage_options=via)
        assert_same(trainstate.load(f"{url}/ckpt", storage_options=via), _state(1))
    finally:
        proxy.stop()
    assert [f.hits for f in faults] == [2, 1, 1]  # each was hit, and retried past


@pytest.mark.parametrize("status, code, match", [(403, "AccessDenied", "access denied")])
def test_permanent_errors_fail_at_once_naming_the_url_and_no_secret(s3_run, s3_endpoint, caplog, status, code, match):
    url, opts = s3_run
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.faults.append(Fault(r"^PUT ", status, code, times=100))
    try:
        with caplog.at_level(logging.DEBUG, logger="trainstate"), pytest.raises(CheckpointWriteError) as info:
            trainstate.save(f"{url}/ckpt", _state(1), storage_options={**opts, "endpoint_url": proxy.endpoint})
    finally:
        proxy.stop()
    message = str(info.value)
    assert message.startswith(f"{url}/ckpt") and match in message and "\n" not in message
    assert len([r for r in proxy.seen if r.startswith("PUT ")]) == 1  # not retried
    assert SECRET not in message and SECRET not in caplog.text and SECRET not in repr(info.value.__cause__)
    assert _keys(s3_endpoint, url) == []


def test_a_missing_bucket_is_one_clear_line(s3_endpoint):
    opts = options(s3_endpoint)
    with pytest.raises(CheckpointWriteError, match=r"^s3://no-such-bucket-ts/run/ckpt: .*no such bucket"):
        trainstate.save("s3://no-such-bucket-ts/run/ckpt", {"w": torch.ones(1)}, storage_options=opts)
    with pytest.raises(trainstate.CheckpointNotFoundError, match="s3://no-such-bucket-ts/run/ckpt"):
        trainstate.load("s3://no-such-bucket-ts/run/ckpt", storage_options=opts)


def test_a_large_file_goes_up_in_parallel_parts(s3_run, s3_endpoint):
    url, opts = s3_run
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    try:
        storage = ObjectStorage(url, {**opts, "endpoint_url": proxy.endpoint}, part_size=5 << 20, concurrency=4)
        big = {"w": torch.randn(5 << 20)}  # 20 MiB: 4 full parts and a tail
        trainstate.api.execute_save(trainstate.api.plan_state(big), storage.begin("ckpt"))
        with trainstate.format.CheckpointReader(storage, "ckpt") as reader:
            assert_same(trainstate.api.restore(reader, None), big)
    finally:
        proxy.stop()
    parts = [r for r in proxy.seen if "partNumber=" in r and r.startswith("PUT")]
    assert len(parts) == 5 and any(r.startswith("POST") and "uploads" in r for r in proxy.seen)
    ranged = [r for r in proxy.seen if r.startswith("GET") and "tensors-00000" in r]
    assert len(ranged) >= 2  # the header, then the tensor bytes: ranged reads, not one whole-object GET


def test_tiered_manager_uploads_in_the_background_and_restores_from_either_tier(tmp_path, s3_run, s3_endpoint):
    url, opts = s3_run
    local = tmp_path / "local"
    with CheckpointManager(local, remote=url, keep_last=3, keep_local=1, async_save=True, storage_options=opts) as m:
        for step in range(1, 6):
            m.save(step, _state(step))
        m.wait_for_uploads()
        assert m.steps() == [3, 4, 5] and sorted(os.listdir(local)) == ["step_00000005"]
    assert {k.split("/")[0] for k in _keys(s3_endpoint, url)} == {"step_00000003", "step_00000004", "step_00000005"}
    _damage(s3_endpoint, url, "step_00000005")  # the remote copy of 5 rots: the local one is used
    state = {"w": torch.zeros(64, 32), "b": torch.zeros(5, dtype=torch.int64)}
    with CheckpointManager(local, remote=url, keep_last=3, keep_local=1, storage_options=opts) as m:
        assert m.restore(state) == 5
    assert_same(state, _state(5))
    import shutil

    shutil.rmtree(local)  # a new machine: nothing local
    with CheckpointManager(local, remote=url, keep_last=3, keep_local=1, storage_options=opts) as m:
        assert m.restore(state) == 4  # 5's only copy is damaged: fall back to the remote 4
    assert_same(state, _state(4))


def test_a_crash_between_local_commit_and_upload_is_uploaded_on_restart(tmp_path, s3_run, s3_endpoint):
    url, opts = s3_run
    # held: the start of step 2's upload, after it was committed locally
    pattern = r"^PUT .*step_00000002/.*trainstate-writer"
    _kill_when_held(["manager", url, str(tmp_path / "local")], s3_endpoint, pattern, ["saved 1", "saved 2"])
    assert "step_00000002" not in {k.split("/")[0] for k in _keys(s3_endpoint, url) if k.endswith("manifest.json")}
    remote = ObjectStorage(url, opts, lease_ttl=2)
    with CheckpointManager(tmp_path / "local", remote=remote, keep_last=None, lock_timeout=30) as m:
        state = {"w": torch.zeros(3 << 20), "step": torch.tensor(0)}
        assert m.restore(state) == 2
        m.save(3, {"w": state["w"], "step": torch.tensor(3)})
        m.wait_for_uploads()
    committed = {k.split("/")[0] for k in _keys(s3_endpoint, url) if k.endswith("manifest.json")}
    assert committed == {"step_00000001", "step_00000002", "step_00000003"}
    uploaded = trainstate.load(f"{url}/step_00000002", storage_options=opts)
    assert torch.equal(uploaded["w"], state["w"]) and int(uploaded["step"]) == 2


def test_no_overwrite_and_not_a_checkpoint_are_refused(s3_run, s3_endpoint):
    url, opts = s3_run
    trainstate.save(f"{url}/ckpt", {"w": torch.ones(1)}, storage_options=opts)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        trainstate.save(f"{url}/ckpt", {"w": torch.zeros(1)}, overwrite=False, storage_options=opts)
    bucket, prefix = _bucket_of(url)
    client(s3_endpoint).put_object(Bucket=bucket, Key=f"{prefix}/logs/train.log", Body=b"not a checkpoint")
    with pytest.raises(CheckpointExistsError, match="is not a trainstate checkpoint"):
        trainstate.save(f"{url}/logs", {"w": torch.zeros(1)}, storage_options=opts)
    assert torch.equal(trainstate.load(f"{url}/ckpt", storage_options=opts)["w"], torch.ones(1))


@pytest.mark.slow
def test_a_two_rank_fsdp2_save_commits_once_on_s3_and_reshards_to_one_process(tmp_path, s3_run, s3_endpoint):
    import json

    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
    import workers

    url, opts = s3_run
    assert workers.launch(workers.s3_sharded, 2, f"{url}/ckpt", s3_endpoint, str(tmp_path)) == [0, 0]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"same": True, "step": 2}
    names = [k for k in _keys(s3_endpoint, url) if not k.endswith(".trainstate-writer")]
    assert names[-1] == "ckpt/manifest.json" and len({k.split("/")[1] for k in names[:-1]}) == 1  # one attempt
    model_full, _ = torch.load(tmp_path / "full.pt")
    single = trainstate.load(f"{url}/ckpt", storage_options=opts)
    assert_same(dict(single["model"]), dict(model_full))


def test_a_live_lease_is_renewed_past_its_ttl_and_a_lost_one_stops_commits(s3_run, s3_endpoint):
    import time

    url, opts = s3_run
    holder = CheckpointManager(ObjectStorage(url, opts, lease_ttl=1.5), keep_last=None)
    holder.save(1, _state(1))
    time.sleep(4)  # what is tested is time itself: more than two ttls without a save
    rival = ObjectStorage(url, opts, lease_ttl=1.5)
    with pytest.raises(CheckpointLockedError):
        rival.lock(timeout=0)  # renewed in the background: never expired
    bucket, prefix = _bucket_of(url)
    client(s3_endpoint).put_object(Bucket=bucket, Key=f"{prefix}/.trainstate-lease", Body=b'{"token": "intruder"}')
    deadline = time.monotonic() + 30
    while not holder._storage._lease._lost and time.monotonic() < deadline:  # the next renewal notices
        time.sleep(0.05)
    with pytest.raises(CheckpointLockedError, match="lost its lease"):
        holder.save(2, _state(2))
    assert holder.steps() == [1]
    holder.close()
