"""rlhf.dpo: direct preference optimisation of the policy on comparisons (DPO, IPO)."""
