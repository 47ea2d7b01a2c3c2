"""A sweep on a real Dask distributed cluster: a local scheduler and two worker processes started
by the test on 127.0.0.1, one scenario run per task, the files gathered into the output directory;
the same seed gives the same bytes as the local process-pool sweep."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

distributed = pytest.importorskip("distributed", reason="the dask `distributed` package (cluster extra) is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCENARIO = pathlib.Path(__file__).parent / "small.toml"
SWEEP = "providers.offline_frac=0.0,0.5"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(out: pathlib.Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


@pytest.fixture
def cluster(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    logs = [open(tmp_path / f"{n}.log", "w") for n in ("scheduler", "worker1", "worker2")]
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"], env=env, stdout=logs[0], stderr=logs[0],
                              cwd=tmp_path)]
    try:
        deadline = time.monotonic() + 60  # a hang guard for the scheduler's start
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert procs[0].poll() is None and time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
                time.sleep(0.2)
        for i in (1, 2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers", "1",
                 "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}",
                 "--local-directory", str(tmp_path / f"w{i}")],
                env=env, stdout=logs[i], stderr=logs[i], cwd=tmp_path))
        from distributed import Client

        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            assert len(client.scheduler_info()["workers"]) == 2
        yield address
    finally:
        for p in reversed(procs):  # only the processes this test started, by their handles
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def test_sweep_on_a_dask_cluster__same_files_as_the_local_sweep(tmp_path, cluster):
    from distributed import Client

    def sweep(out, *extra):
        proc = subprocess.run([sys.executable, "-m", "simulations", str(SCENARIO), "--out", str(out),
                               "--seed", "7", "--sweep", SWEEP, "--quiet", *extra],
                              capture_output=True, text=True, timeout=600, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        assert proc.returncode == 0, proc.stderr[-3000:]

    with Client(cluster, timeout=30) as client:
        client.get_task_stream()  # installs the scheduler's task-stream recorder
        t0 = time.time()
        sweep(tmp_path / "dask", "--cluster", cluster)
        stream = [t for t in client.get_task_stream(start=t0) if str(t["key"]).startswith("sweep-")]
    sweep(tmp_path / "local", "--jobs", "2")
    on_cluster, local = files(tmp_path / "dask"), files(tmp_path / "local")
    assert "providers.offline_frac=0.5/metrics.json" in on_cluster and "sweep.csv" in on_cluster
    assert on_cluster == local
    # One scenario run per task, and the two runs went to the two workers (each has one thread).
    assert sorted(str(t["key"]) for t in stream) == ["sweep-0", "sweep-1"]
    assert len({t["worker"] for t in stream}) == 2


def test_sweep_on_a_cluster__no_scheduler_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "simulations", str(SCENARIO), "--out", str(tmp_path / "x"),
                           "--sweep", SWEEP, "--quiet", "--cluster", f"tcp://127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
