"""One-time setup run by ``make`` after installing: build DeepSpeed's CPU shared-memory
communication op into ``TORCH_EXTENSIONS_DIR`` so the first training run does not pay for it."""

from __future__ import annotations

import logging
import os


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import torch

    if torch.cuda.is_available():
        logging.info("CUDA present: DeepSpeed uses NCCL, no CPU op to build")
        return
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    logging.info("building DeepSpeed shm_comm into %s (once)", os.environ.get("TORCH_EXTENSIONS_DIR"))
    ShareMemCommBuilder().load(verbose=False)


if __name__ == "__main__":
    main()
