"""One typed config tree for a dwmtrain run.

YAML file -> dotted ``key=value`` overrides -> dataclasses that validate themselves. The DeepSpeed JSON is
*generated* from this tree plus a ZeRO template in ``ds_configs/``, so micro-batch, accumulation,
precision and the global batch live in one place (``DeepSpeedConfig``) and are checked against each other and
the world size.

    schema.py     the sections and their fields          load.py       YAML, base configs, overrides
    batch.py      batch arithmetic (pure)                deepspeed.py  the generated DeepSpeed JSON
    checks.py     the field checks every section uses
"""

from dwmtrain.config.batch import BatchPlan, batch_plan, global_batch_sequences, resolve_batch
from dwmtrain.config.deepspeed import DS_TEMPLATE_DIR, build_deepspeed_config, resolve_precision
from dwmtrain.config.load import (
    CONFIG_DIR,
    bundled_configs,
    load_config,
    parse_override,
    read_config_tree,
    resolve_config_path,
)
from dwmtrain.config.schema import (
    PACKAGE_DIR,
    Config,
    DataConfig,
    DeepSpeedConfig,
    DWMConfig,
    MetaConfig,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    StagesConfig,
    package_path,
)
from dwmtrain.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "DS_TEMPLATE_DIR",
    "PACKAGE_DIR",
    "BatchPlan",
    "Config",
    "ConfigError",
    "DWMConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "MetaConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "StagesConfig",
    "batch_plan",
    "build_deepspeed_config",
    "bundled_configs",
    "global_batch_sequences",
    "load_config",
    "package_path",
    "parse_override",
    "read_config_tree",
    "resolve_batch",
    "resolve_config_path",
    "resolve_precision",
]
