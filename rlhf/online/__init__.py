"""The online RLHF loop: stored human choices -> reward model -> PPO -> a new served policy."""
