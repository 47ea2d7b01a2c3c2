"""The provider's runtimes (node/runtime.py): the container a rental gets, against the real
Docker daemon where one answers (the GPU request is checked on the config built from fake
NVML UUIDs: no NVIDIA runtime exists here)."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid

import pytest
import trio

from node.fake_nvml import FakeNvml
from node.runtime import (BRIDGE_NAME, LABEL_AGREEMENT, LABEL_PROVIDER, DockerRuntime, DockerSettings,
                          HookRuntime, RentalSpec, RuntimeError_, container_config, container_name,
                          nvml_uuids, share_limits)
from tests.docker_image import docker_client, no_daemon_reason, busybox_image

docker = pytest.importorskip("docker", reason="the docker SDK is not installed (pip install -e .)")
needs_daemon = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())


def spec_for(nvml: FakeNvml, indices: list[int], total: int, *, aid: bytes | None = None,
             image: str = "") -> RentalSpec:
    by_digest = nvml_uuids(nvml)
    uuids = [nvml.gpus[i].uuid for i in indices]
    digests = tuple(hashlib.sha256(u.encode()).digest() for u in uuids)
    assert all(by_digest[d] == u for d, u in zip(digests, uuids))
    return RentalSpec(agreement_id=aid or os.urandom(32), renter_peer_id="12D3KooWrenter",
                      renter_wallet=b"\x11" * 20, gpu_digests=digests, gpu_uuids=tuple(uuids),
                      share=len(indices) / total, max_seconds=600, access_key="k", image=image)


def test_docker_daemon__answers_where_ci_requires_it():
    """.ci/run starts a daemon and sets GPUMARKET_REQUIRE_DOCKER: there, a missing daemon is a
    failure, not a skip."""
    if os.environ.get("GPUMARKET_REQUIRE_DOCKER") != "1":
        pytest.skip("GPUMARKET_REQUIRE_DOCKER is not set (only .ci/run requires the daemon)")
    assert docker_client() is not None, no_daemon_reason()


def test_container_config__exactly_the_rented_gpus_by_uuid_and_the_share_of_the_host():
    nvml = FakeNvml.with_gpus(4)
    spec = spec_for(nvml, [1, 3], 4)
    settings = DockerSettings(images=("img:a", "img:b"), gpus="nvidia", cpus=16, memory_mib=64_000,
                              pids=4096)
    cfg = container_config(spec, settings, "12D3KooWprovider")
    (request,) = cfg["device_requests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == [nvml.gpus[1].uuid, nvml.gpus[3].uuid]  # never indices
    assert request["Capabilities"] == [["gpu", "compute", "utility"]]
    assert cfg["environment"]["NVIDIA_VISIBLE_DEVICES"] == f"{nvml.gpus[1].uuid},{nvml.gpus[3].uuid}"
    assert cfg["nano_cpus"] == 8 * 10**9  # half the GPUs: half of the 16 CPUs
    assert cfg["mem_limit"] == cfg["memswap_limit"] == 32_000 * 1024 * 1024
    assert cfg["pids_limit"] == 2048
    assert cfg["image"] == "img:a" and cfg["privileged"] is False and cfg["cap_drop"] == ["ALL"]
    assert cfg["cap_add"] is None and cfg["security_opt"] == ["no-new-privileges:true"]
    assert cfg["mounts"] == [] and "volumes" not in cfg and cfg["network_mode"] == "gpumarket"
    assert cfg["labels"] == {LABEL_AGREEMENT: spec.hex, LABEL_PROVIDER: "12D3KooWprovider",
                             "gpumarket.renter": "12D3KooWrenter"}
    # the switch for machines without the NVIDIA runtime: no GPU request at all
    no_gpu = container_config(spec, DockerSettings(images=("img:a",), gpus="none", network="none"), "p")
    assert "device_requests" not in no_gpu and no_gpu["network_mode"] == "none"
    # the scratch volume is the only mount
    scratch = container_config(spec, DockerSettings(images=("img:a",), scratch=True), "p")
    assert [(m["Target"], m["Type"]) for m in scratch["mounts"]] == [("/scratch", "volume")]


def test_container_config__only_an_offered_image():
    spec = spec_for(FakeNvml.with_gpus(1), [0], 1, image="evil:latest")
    with pytest.raises(RuntimeError_, match="not one this provider offers"):
        container_config(spec, DockerSettings(images=("img:a",)), "p")


def test_share_limits__proportional_with_floors():
    s = DockerSettings(images=("i",), cpus=8, memory_mib=1000, pids=100)
    assert share_limits(s, 1.0) == share_limits(s, 1.0)
    one = share_limits(s, 0.125)
    assert (one.nano_cpus, one.memory_bytes // 2**20, one.pids) == (10**9, 125, 16)
    with pytest.raises(ValueError):
        share_limits(s, 0)


async def test_hook_runtime__prints_access_or_fails_with_a_reason(tmp_path):
    spec = spec_for(FakeNvml.with_gpus(1), [0], 1)
    hook = HookRuntime(["sh", "-c", "cat >/dev/null; echo ssh -p 2222 rent@host"])
    assert await hook.start(spec) == "ssh -p 2222 rent@host"
    with pytest.raises(RuntimeError_, match="exited 3"):
        await HookRuntime(["sh", "-c", "exit 3"]).start(spec)
    assert await hook.warn_stop(spec.agreement_id) is False  # a preemption tells the hook nothing


# -- against the real daemon ------------------------------------------------------------------


def _settings(**kw) -> DockerSettings:
    base = dict(images=(busybox_image(),), gpus="none", cpus=1.0, memory_mib=512, pids=256)
    base.update(kw)
    return DockerSettings(**base)


def _exec(container, cmd: str) -> tuple[int, str]:
    code, out = container.exec_run(["sh", "-c", cmd])
    return code, out.decode(errors="replace")


@pytest.fixture
def provider_id():
    """A fresh provider identity per test: reconcile touches only this node's containers."""
    pid = f"test-{uuid.uuid4().hex[:12]}"
    yield pid
    client = docker_client()
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_PROVIDER}={pid}"}):
        c.remove(force=True, v=True)


@needs_daemon
async def test_docker__container_has_the_limits_no_host_files_and_is_gone_after_stop(provider_id):
    rt = DockerRuntime(_settings(scratch=True), provider_id)
    await rt.prepare()
    spec = spec_for(FakeNvml.with_gpus(4), [0], 4)
    access = await rt.start(spec)
    assert "gpumarket shell" in access
    client = docker_client()
    c = client.containers.get(container_name(spec.agreement_id))
    host = c.attrs["HostConfig"]
    assert host["NanoCpus"] == 250_000_000  # a quarter of 1 CPU
    assert host["Memory"] == host["MemorySwap"] == 128 * 2**20 and host["PidsLimit"] == 64
    assert host["Privileged"] is False and host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"] and host["Binds"] in (None, [])
    assert [(m["Type"], m["Destination"]) for m in c.attrs["Mounts"]] == [("volume", "/scratch")]
    assert c.labels[LABEL_AGREEMENT] == spec.hex
    # nothing of the host's file system: not this test file, not the docker socket
    assert _exec(c, f"test -e {__file__} || test -e /var/run/docker.sock; echo $?")[1].strip() == "1"
    assert _exec(c, "cat /proc/self/status | grep NoNewPrivs")[1].split() == ["NoNewPrivs:", "1"]
    assert _exec(c, "grep CapEff /proc/self/status")[1].split() == ["CapEff:", "0000000000000000"]
    assert _exec(c, "touch /scratch/x && echo ok")[1].strip() == "ok"
    # idempotent start (a restarted node resuming the rental) keeps the same container
    await rt.start(spec)
    assert client.containers.get(container_name(spec.agreement_id)).id == c.id
    assert await rt.alive(spec.agreement_id)
    # warn_stop (a preemption notice): SIGTERM reaches a process of the container, which keeps
    # running (its keepalive ignores TERM)
    c.exec_run(["sh", "-c", "trap 'echo termed > /termed; exit' TERM; touch /trapped; "
                "while true; do sleep 1; done"], detach=True)
    with trio.fail_after(10):  # the trap is set before the signal is sent
        while _exec(c, "test -e /trapped")[0] != 0:
            await trio.sleep(0.1)
    assert await rt.warn_stop(spec.agreement_id) is True
    with trio.fail_after(10):
        while _exec(c, "cat /termed")[1].strip() != "termed":
            await trio.sleep(0.1)
    assert await rt.alive(spec.agreement_id)
    await rt.stop(spec.agreement_id)
    assert not await rt.alive(spec.agreement_id)
    assert await rt.warn_stop(spec.agreement_id) is False  # no container: nothing told
    assert not client.containers.list(all=True, filters={"label": f"{LABEL_AGREEMENT}={spec.hex}"})
    assert not [v for v in client.volumes.list() if v.name.endswith(spec.hex[:16])]
    await rt.stop(spec.agreement_id)  # again: nothing to do, no error


@needs_daemon
async def test_docker__reconcile_keeps_live_rentals_removes_the_rest_and_not_other_nodes(provider_id):
    rt = DockerRuntime(_settings(network="none"), provider_id)
    other = DockerRuntime(_settings(network="none"), provider_id + "-other")
    await rt.prepare()
    nvml = FakeNvml.with_gpus(2)
    live, dead, foreign = spec_for(nvml, [0], 2), spec_for(nvml, [1], 2), spec_for(nvml, [0], 2)
    async with trio.open_nursery() as n:
        for r, s in ((rt, live), (rt, dead), (other, foreign)):
            n.start_soon(r.start, s)
    try:
        done = await rt.reconcile({live.agreement_id})
        assert done == {"kept": [live.hex], "removed": [dead.hex]}
        assert await rt.alive(live.agreement_id) and not await rt.alive(dead.agreement_id)
        assert await other.alive(foreign.agreement_id)  # another node's container is not ours
    finally:
        await other.stop(foreign.agreement_id)
        await rt.stop(live.agreement_id)


@needs_daemon
async def test_docker__a_rental_reaches_neither_another_rental_nor_the_hosts_ports(provider_id):
    rt = DockerRuntime(_settings(), provider_id)
    await rt.prepare()
    nvml = FakeNvml.with_gpus(2)
    a, b = spec_for(nvml, [0], 2), spec_for(nvml, [1], 2)
    await rt.start(a)
    await rt.start(b)
    client = docker_client()
    ca = client.containers.get(container_name(a.agreement_id))
    cb = client.containers.get(container_name(b.agreement_id))
    net = cb.attrs["NetworkSettings"]["Networks"]["gpumarket"]
    ip_b, gateway = net["IPAddress"], net["Gateway"]
    listener = socket.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        # B listens; A cannot connect (inter-container traffic is off on the rental bridge)
        cb.exec_run(["sh", "-c", "nc -l -p 7000 >/dev/null"], detach=True)
        await trio.sleep(0.3)
        code, _ = _exec(ca, f"echo hi | nc -w 2 {ip_b} 7000")
        assert code != 0
        # B itself can (the listener is there, so the refusal above was the bridge's)
        assert _exec(cb, "echo hi | nc -w 2 127.0.0.1 7000; echo $?")[1].strip().endswith("0")
        # the host's own ports, on the bridge's gateway address: dropped where iptables runs
        code, _ = _exec(ca, f"echo hi | nc -w 2 {gateway} {port}")
        if rt.host_blocked:
            assert code != 0
        else:
            pytest.skip("iptables unavailable: the host's ports stay reachable (logged at prepare)")
    finally:
        listener.close()
        await rt.stop(a.agreement_id)
        await rt.stop(b.agreement_id)
        assert BRIDGE_NAME  # the bridge stays for the next rental
