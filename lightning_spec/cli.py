"""`lightning-spec`: LightningCLI over any lightning-spec (or user) module and datamodule.

Example::

    lightning-spec fit --config examples/smollm2_draft.yaml
    lightning-spec fit --config examples/smollm2_draft.yaml --print_config
    lightning-spec eval --drafts fkl=artifacts/smollm2_draft untrained=cut:0,1,2,3   (see lightning_spec.evaluate)
"""
from __future__ import annotations

import sys
from typing import List, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

import lightning_spec  # noqa: F401  (registers short class names for YAML)


def build_cli(args: Optional[List[str]] = None, run: bool = True) -> LightningCLI:
    """The LightningCLI over any module/datamodule; ``run=False`` only instantiates (for tests and tools)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main() -> None:
    """Console entry point: `eval` goes to lightning_spec.evaluate, everything else to LightningCLI; returns
    nothing, so the process exits 0 on success."""
    if sys.argv[1:2] == ["eval"]:
        from lightning_spec.evaluate import main as evaluate_main

        evaluate_main(sys.argv[2:])
        return
    build_cli()


if __name__ == "__main__":
    main()
