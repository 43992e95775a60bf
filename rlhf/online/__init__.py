"""The online RLHF loop: stored human choices -> a reward-model update and RL, or a DPO update -> a
new served policy."""
