"""`lightning-spec`: LightningCLI over any lightning-spec (or user) module and datamodule.

Example::

    lightning-spec fit --config examples/smollm2_draft.yaml
    lightning-spec fit --config examples/smollm2_draft.yaml --print_config
"""
from __future__ import annotations

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
    """Console entry point: returns nothing, so the process exits 0 on success."""
    build_cli()


if __name__ == "__main__":
    main()
