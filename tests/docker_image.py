"""The Docker daemon and the test image for the runtime tests (no registry is reachable:
the image is built FROM scratch with the host's static busybox; nothing is ever pulled).

`docker_client()` is None where no daemon answers (the tests then skip, saying so); .ci/run
starts one, so in CI they run.
"""

from __future__ import annotations

import functools
import io
import shutil
import tarfile
from pathlib import Path

TEST_IMAGE = "gpumarket-test-busybox:1"
BUSYBOX_PATHS = ("/usr/bin/busybox", "/bin/busybox")  # Debian's busybox-static
DOCKERFILE = b"""FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["/bin/sh"]
"""


@functools.cache
def docker_client():
    try:
        import docker
    except ImportError:
        return None
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception:
        return None
    return client


def no_daemon_reason() -> str:
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed (pip install -e .)"
    return "no Docker daemon answers (DOCKER_HOST or /var/run/docker.sock); .ci/run starts one"


def _static_busybox() -> Path:
    for p in BUSYBOX_PATHS:
        path = Path(p)
        if path.exists():
            return path
    found = shutil.which("busybox")
    if found is None:
        raise RuntimeError("no busybox binary: apt-get install busybox-static")
    return Path(found)


@functools.cache
def busybox_image() -> str:
    """Build the image once per session (kept between sessions: same tag, same content)."""
    import docker.errors

    client = docker_client()
    try:
        client.images.get(TEST_IMAGE)
        return TEST_IMAGE
    except docker.errors.ImageNotFound:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(DOCKERFILE)
        tar.addfile(info, io.BytesIO(DOCKERFILE))
        tar.add(str(_static_busybox()), arcname="busybox")
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=TEST_IMAGE, pull=False, rm=True,
                        forcerm=True)
    return TEST_IMAGE


SECOND_IMAGE = "gpumarket-test-busybox-second:1"
SECOND_DOCKERFILE = f"""FROM {TEST_IMAGE}
RUN ["/bin/sh", "-c", "echo second > /image-name"]
""".encode()


@functools.cache
def second_image() -> str:
    """A second image, built locally on top of busybox_image() (nothing pulled), with the file
    /image-name saying "second": tells which image a container runs."""
    import docker.errors

    busybox_image()
    client = docker_client()
    try:
        client.images.get(SECOND_IMAGE)
        return SECOND_IMAGE
    except docker.errors.ImageNotFound:
        pass
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(SECOND_DOCKERFILE)
        tar.addfile(info, io.BytesIO(SECOND_DOCKERFILE))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=SECOND_IMAGE, pull=False, rm=True,
                        forcerm=True)
    return SECOND_IMAGE
