"""A minimal @hydra.main app wired the way xpar's entry point must be (used by the tests)."""

import json
import logging
import os

import hydra

from xpar.config import CONFIG_DIR, load_and_validate, to_plain_dict
from xpar.redact import redact_hydra_output

log = logging.getLogger("xpar.config_hydra_app")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg) -> None:
    redact_hydra_output()
    xcfg = load_and_validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    log.info("composed run %s", xcfg.logger.run_name)
    log.warning("a warning every rank shows")
    print("RESULT " + json.dumps({"cwd": os.getcwd(), "cfg": to_plain_dict(xcfg)}), flush=True)


if __name__ == "__main__":
    main()
