import hashlib
import shutil

import pytest

from node.fake_nvml import (
    NVML_ERROR_DRIVER_NOT_LOADED,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    FakeGpu,
    FakeNvml,
)
from node.gpu import GpuProbe, NoGpuError, host_facts


@pytest.mark.parametrize("n", [1, 2, 8])
def test_probe__static_facts_for_n_gpus(tmp_path, n):
    fake = FakeNvml.with_gpus(n)
    with GpuProbe(fake) as probe:
        facts = probe.static_facts(tmp_path)
    assert fake.initialised == 0  # shut down on exit
    assert [g.index for g in facts.gpus] == list(range(n))
    assert facts.driver_version == "550.54.15"
    assert facts.cuda_driver_version == 12040
    assert facts.skipped == ()
    g = facts.gpus[-1]
    assert g.model == "NVIDIA H100 80GB HBM3"
    assert g.vram_mib == 81559
    assert g.compute_capability == (9, 0)
    assert (g.pcie_generation, g.pcie_width) == (5, 16)  # max link, not the idle current link
    assert g.power_limit_w == 700
    assert g.uuid_sha256 == hashlib.sha256(fake.gpus[-1].uuid.encode()).digest()
    assert len({x.uuid_sha256 for x in facts.gpus}) == n
    # the raw UUID appears nowhere in what the probe returns
    assert fake.gpus[-1].uuid not in repr(facts)


def test_probe__live_metrics(tmp_path):
    fake = FakeNvml([FakeGpu(utilization_pct=97, memory_used_mib=40000, temperature_c=71, power_mw=612_345),
                     FakeGpu(uuid="GPU-2")])
    with GpuProbe(fake) as probe:
        m = probe.live_metrics()
    assert [(x.index, x.utilization_pct, x.memory_used_mib, x.temperature_c, x.power_mw) for x in m] == [
        (0, 97, 40000, 71, 612_345),
        (1, 0, 512, 34, 71_000),
    ]


@pytest.mark.parametrize(
    "code, words",
    [
        (NVML_ERROR_LIBRARY_NOT_FOUND, "no NVIDIA driver"),
        (NVML_ERROR_DRIVER_NOT_LOADED, "driver is not loaded"),
    ],
)
def test_probe__nvml_init_failure_is_no_gpu(code, words):
    with pytest.raises(NoGpuError, match=words):
        GpuProbe(FakeNvml.with_gpus(1, init_error=code)).open()


def test_probe__zero_devices_is_no_gpu():
    fake = FakeNvml([])
    with pytest.raises(NoGpuError, match="reports no GPU"):
        GpuProbe(fake).open()
    assert fake.initialised == 0


def test_probe__unsupported_optional_queries_are_none_or_fall_back(tmp_path):
    gpu = FakeGpu(errors={
        "nvmlDeviceGetMaxPcieLinkGeneration": NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetMaxPcieLinkWidth": NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetPowerManagementLimit": NVML_ERROR_NOT_SUPPORTED,
        "nvmlDeviceGetEnforcedPowerLimit": NVML_ERROR_NOT_SUPPORTED,
    })
    with GpuProbe(FakeNvml([gpu])) as probe:
        (g,) = probe.static_facts(tmp_path).gpus
    assert (g.pcie_generation, g.pcie_width) == (1, 16)  # current link as fallback
    assert g.power_limit_w is None


def test_probe__gpu_failing_an_identity_query_is_left_out(tmp_path):
    gpus = [FakeGpu(uuid="GPU-a"),
            FakeGpu(uuid="GPU-b", errors={"nvmlDeviceGetUUID": NVML_ERROR_GPU_IS_LOST}),
            FakeGpu(uuid="GPU-c")]
    with GpuProbe(FakeNvml(gpus)) as probe:
        facts = probe.static_facts(tmp_path)
        assert [g.index for g in facts.gpus] == [0, 2]
        assert facts.skipped == ((1, "GPU is lost"),)
        # live metrics still sample the others; the failing field is None only where refused
    gpus[0].errors = {"nvmlDeviceGetTemperature": NVML_ERROR_NOT_SUPPORTED}
    with GpuProbe(FakeNvml(gpus)) as probe:
        m = probe.live_metrics()
    assert m[0].temperature_c is None and m[0].power_mw == 71_000
    assert m[2].temperature_c == 34


def test_probe__every_gpu_failing_is_no_gpu(tmp_path):
    gpus = [FakeGpu(errors={"nvmlDeviceGetName": NVML_ERROR_GPU_IS_LOST}) for _ in range(2)]
    with GpuProbe(FakeNvml(gpus)) as probe:
        with pytest.raises(NoGpuError, match="GPU 0: GPU is lost; GPU 1: GPU is lost"):
            probe.static_facts(tmp_path)


def test_probe__handle_failure_marks_only_that_gpu(tmp_path):
    gpus = [FakeGpu(uuid="GPU-a", errors={"nvmlDeviceGetHandleByIndex": NVML_ERROR_GPU_IS_LOST}),
            FakeGpu(uuid="GPU-b")]
    with GpuProbe(FakeNvml(gpus)) as probe:
        facts = probe.static_facts(tmp_path)
        metrics = probe.live_metrics()
    assert [g.index for g in facts.gpus] == [1]
    assert metrics[0].utilization_pct is None and metrics[1].utilization_pct == 0


def test_probe__used_after_close_is_an_error(tmp_path):
    probe = GpuProbe(FakeNvml.with_gpus(1))
    with probe:
        pass
    with pytest.raises(RuntimeError):
        probe.live_metrics()


def test_host_facts__match_the_machine(tmp_path):
    import psutil

    h = host_facts(tmp_path)
    assert h.cpu_cores == psutil.cpu_count(logical=True) >= 1
    assert abs(h.ram_mib - psutil.virtual_memory().total // 2**20) <= 1
    assert abs(h.disk_free_gib - shutil.disk_usage(tmp_path).free // 2**30) <= 1


def _real_nvml_or_skip():
    try:
        import pynvml
    except ImportError:
        pytest.skip("nvidia-ml-py (pynvml) is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver on this machine (nvmlInit: {exc})")
    pynvml.nvmlShutdown()
    return pynvml


def test_probe__real_nvml(tmp_path):
    _real_nvml_or_skip()
    with GpuProbe() as probe:
        facts = probe.static_facts(tmp_path)
        metrics = probe.live_metrics()
    assert facts.gpus and facts.cuda_driver_version > 10000
    for g in facts.gpus:
        assert g.model and g.vram_mib > 0 and g.compute_capability[0] >= 3 and len(g.uuid_sha256) == 32
    assert len(metrics) == len(facts.gpus) + len(facts.skipped)
    print(facts, metrics)


def test_probe__real_nvml_without_driver_says_so():
    try:
        import pynvml
        pynvml.nvmlInit()
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed")
    except Exception:
        with pytest.raises(NoGpuError, match="NVIDIA|NVML"):
            GpuProbe().open()
        return
    pynvml.nvmlShutdown()
    pytest.skip("a driver is present here; the no-driver path is covered by the fake")
