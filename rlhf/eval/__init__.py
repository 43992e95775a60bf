"""rlhf.eval"""
