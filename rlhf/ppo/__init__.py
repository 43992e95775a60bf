"""rlhf.ppo"""
