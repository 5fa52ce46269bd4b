"""Recovery: train the kept weights of a pruned model with its mask fixed (block-wise reconstruction, distillation)."""
