"""rlhf.config"""
