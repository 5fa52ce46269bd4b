"""Recovery: train the kept weights of a pruned model with its mask fixed.

- `RecoveryConfig` — what to run (config.py)
- `recover(student, teacher, config)` → `RecoveryResult` — the one entry point (api.py)
- block-wise reconstruction against the dense blocks — block.py
- distillation from the dense model, checkpointed and resumable — distill.py
- the recovery text, and the refusal of evaluation splits — data.py
- masks held fixed through training — masks.py
- saved state of a run (block stage, distillation checkpoints), written atomically — state.py
"""

from prunelab.recovery.api import RecoveryResult, check_pair, recover
from prunelab.recovery.config import RecoveryConfig
from prunelab.recovery.masks import MaskError, MaskGuard, masks_from_zeros

__all__ = ["MaskError", "MaskGuard", "RecoveryConfig", "RecoveryResult", "check_pair", "masks_from_zeros", "recover"]
