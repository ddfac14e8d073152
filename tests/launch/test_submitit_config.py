"""conf/hydra/launcher/xpar_slurm.yaml composes with xpar's real config and the plugin.

The plugin (hydra-submitit-launcher, the `slurm` extra) is optional: without
it the test skips. A real sweep through it was run by hand on the test Slurm
cluster (see "Running on a cluster" in README.md); it is not part of the suite because
each sweep point is a full trainer start.
"""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from xpar.config.store import CONFIG_DIR, register_configs


@pytest.fixture
def hydra_cfg():
    pytest.importorskip(
        "hydra_plugins.hydra_submitit_launcher",
        reason="hydra-submitit-launcher not installed (pip install 'xpar[slurm]')",
    )
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield lambda *o: compose(config_name="config", overrides=list(o), return_hydra_config=True)
    GlobalHydra.instance().clear()


def test_launcher_config_composes(hydra_cfg):
    cfg = hydra_cfg(
        "hydra/launcher=xpar_slurm",
        "hydra.sweep.dir=runs/lr-sweep",
        "experiment=tiny",
        "hydra.launcher.partition=gpu",
    )
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert launcher["tasks_per_node"] == 1 and launcher["nodes"] == 1
    assert launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] == 0
    # the watcher must listen for the signal submitit asks Slurm for
    assert "export XPAR_PREEMPT_SIGNAL=USR2" in launcher["setup"]
    assert launcher["additional_parameters"] == {"requeue": True, "open-mode": "append"}
    assert OmegaConf.select(
        cfg, "hydra.launcher.submitit_folder", throw_on_resolution_failure=False
    )


def test_unknown_launcher_key_is_rejected(hydra_cfg):
    with pytest.raises(Exception, match="gpus_per_nodes"):
        hydra_cfg("hydra/launcher=xpar_slurm", "hydra.launcher.gpus_per_nodes=8")
