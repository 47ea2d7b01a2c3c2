"""End to end on a devnet (anvil, two `gpumarket node run` processes, the real Docker daemon):
a provider configured with the Docker runtime, a renter that finds it by image, rents, runs a
command, forwards a port to an HTTP server in the container, copies files both ways and stops;
the container is gone afterwards. Skipped where anvil or a Docker daemon is missing (.ci/run
provides both)."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest

from node.anvil import find_anvil
from node.runtime import LABEL_AGREEMENT
from tests.cli.harness import ENV, EXE, anvil_market, gm, start_node, stop, wait_for
from tests.docker_image import busybox_image, docker_client, no_daemon_reason

pytestmark = [
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (.ci/run installs it)"),
    pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason()),
]


def test_cli_containers__rent_run_forward_cp_stop_on_a_devnet(tmp_path):
    image = busybox_image()
    with anvil_market(tmp_path, deployer_key=b"\x02" * 32) as m:
        prov_dir, rent_dir = m.provider_dir, m.renter_dir
        with open(prov_dir / "config.toml", "a") as f:  # the container runtime, no GPU request
            f.write(f'runtime = "docker"\nimages = ["{image}"]\ndocker_gpus = "none"\n'
                    f'docker_cpus = 1\ndocker_memory_mib = 256\n')
        m.fund_renter(token_units=100 * 10**6)

        provider, p_ready = start_node(prov_dir)
        renter, _ = start_node(rent_dir, "--bootstrap", p_ready["addrs"][0])
        forward = None
        try:
            def offers():
                res = gm(rent_dir, "offers", "search", f"image={image}", "--json")
                return json.loads(res.stdout) if res.returncode == 0 else None

            rows = wait_for(offers, 30, "the provider's offer, found by its image")
            assert not json.loads(gm(rent_dir, "offers", "search", "image=pytorch/*", "--json").stdout)
            # an image the offer does not list: the provider refuses it with its code
            out = gm(rent_dir, "rent", rows[0]["offer_id"], "--seconds", "300", "--yes",
                     "--image", "pytorch/pytorch:latest")
            assert out.returncode != 0 and "image_not_offered" in out.stdout + out.stderr, out.stdout + out.stderr
            out = gm(rent_dir, "rent", rows[0]["offer_id"], "--seconds", "300", "--yes", "--image", image)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "gpumarket shell" in out.stdout and "gpumarket run" in out.stdout, out.stdout
            (row,) = json.loads(gm(rent_dir, "rentals", "--json").stdout)
            aid = row["agreement_id"]
            assert row["image"] == image

            out = gm(rent_dir, "run", aid[:12], "--", "sh", "-c", "echo in-the-container; exit 3")
            assert (out.returncode, out.stdout) == (3, "in-the-container\n"), out.stderr

            # forward: an HTTP server in the container, fetched through the P2P connection
            assert gm(rent_dir, "run", aid[:12], "--", "sh", "-c",
                      "mkdir -p /www && echo served-over-p2p > /www/index.html").returncode == 0
            subprocess.Popen([EXE, "--data-dir", str(rent_dir), "run", aid[:12], "--", "httpd", "-f",
                              "-p", "8000", "-h", "/www"], env=ENV, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            forward = subprocess.Popen([EXE, "--data-dir", str(rent_dir), "forward", aid[:12], "0:8000"],
                                       env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            line = forward.stdout.readline()
            port = int(line.split("127.0.0.1:")[1].split()[0])

            def fetch():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as r:
                        return r.read()
                except OSError:
                    return None

            assert wait_for(fetch, 20, "the page through forward") == b"served-over-p2p\n"

            # cp both ways
            src = tmp_path / "upload.txt"
            src.write_text("a file from the renter\n")
            out = gm(rent_dir, "cp", str(src), f"{aid[:12]}:/www")
            assert out.returncode == 0, out.stderr
            back = tmp_path / "back"
            back.mkdir()
            out = gm(rent_dir, "cp", f"{aid[:12]}:/www/upload.txt", str(back))
            assert out.returncode == 0, out.stderr
            assert (back / "upload.txt").read_text() == "a file from the renter\n"

            # stop: the escrow closes, the provider's watcher ends service, the container goes
            assert gm(rent_dir, "rental", "stop", aid[:12]).returncode == 0
            wait_for(lambda: not docker_client().api.containers(
                all=True, filters={"label": f"{LABEL_AGREEMENT}={aid}"}), 40, "the container removed")
            out = gm(rent_dir, "run", aid[:12], "--", "true")
            assert out.returncode == 125 and "refused (rental_over)" in out.stderr, out.stderr
        finally:
            if forward is not None:
                forward.kill()
                forward.wait(10)
            for proc in (renter, provider):
                stop(proc)
            for c in docker_client().api.containers(all=True, filters={"label": LABEL_AGREEMENT}):
                if c["Labels"].get("gpumarket.provider") == p_ready["peer_id"]:
                    docker_client().api.remove_container(c["Id"], force=True)
